"""Pairwise preference rewards: `preference_fn(prompts, outputs_a, outputs_b) -> (B,)` probabilities that a beats b.

A preference compares two outputs of the same prompt instead of scoring one: `P(a beats b | prompt)` in [0, 1], float32
`(B,)`. It is what REBEL's preference extension regresses on (`l(x, y, y'')`, Appendix D of the paper) and what
`python -m rebel_diffusion.sample --compare-base` turns into a win rate against the base model.

Like a reward, a preference is built by a factory `factory(device=..., dtype=..., **options) -> preference_fn`,
registered by name (`register_preference`), named as a `module:function` path to a user function with the same
signature, or a preference server's URL (`http://host:port`, `python -m rebel_diffusion.serve_reward --preference`).
Outputs are what the policy produces: images `(B, 3, H, W)` in [0, 1] or lists of strings.

Registered here: `bradley_terry`, any scalar reward spec turned into a pairwise preference,
`P(a beats b) = sigmoid((r(a) - r(b)) / temperature)`; `rebel_diffusion.rewards.alignment` registers PickScore's and
HPS v2.1's two-image softmax (`pickscore`, `hpsv2`).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import numpy as np
import torch

from rebel_diffusion.rewards import (RewardSetupError, _factory_options, check_reward_name, is_url, make_reward_fn,
                                     reward_kind, reward_options)
from rebel_diffusion.rewards.remote import check_url, remote_preference

PreferenceFn = Callable[[list[str], Any, Any], torch.Tensor]
PreferenceFactory = Callable[..., PreferenceFn]

_FACTORIES: dict[str, PreferenceFactory] = {}
_KINDS: dict[str, str | Callable[[dict[str, Any]], str]] = {}


def register_preference(name: str, kind: str | Callable[[dict[str, Any]], str] = "image"
                        ) -> Callable[[PreferenceFactory], PreferenceFactory]:
    """Decorator registering `factory(device=None, dtype=None, **options) -> preference_fn` under `name`; `kind` is
    what it compares: "image", "text" or "any", or a function of the options that says it (`bradley_terry` compares
    what its reward scores)."""

    def wrap(factory: PreferenceFactory) -> PreferenceFactory:
        _FACTORIES[name] = factory
        _KINDS[name] = kind
        return factory

    return wrap


def available_preferences() -> list[str]:
    """Names of the registered preferences."""
    return sorted(_FACTORIES)


def preference_kind(name: str, options: dict[str, Any] | None = None) -> str:
    """What a preference compares ("image", "text" or "any"), given its options; a `module:function` path or a server
    (which says so only when asked, `RemotePreference.served_kind`) is "any"."""
    kind = _KINDS.get(name, "any")
    return kind(options or {}) if callable(kind) else kind


def check_preference_name(name: str) -> None:
    """`ValueError` (one line) unless `name` is a registered preference, an importable `module:function` or a
    preference server's URL (not contacted here)."""
    if name in _FACTORIES:
        return
    if is_url(name):
        check_url(name, "preference server URL")
        return
    if ":" not in name:
        raise ValueError(f"unknown preference {name!r}; choose one of {available_preferences()} or give a "
                         f"'module:function' path or a server's http://host:port")
    module_name, fn_name = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"preference {name!r}: cannot import module {module_name!r} ({e})") from None
    if not callable(getattr(module, fn_name, None)):
        raise ValueError(f"preference {name!r}: module {module_name!r} has no function {fn_name!r}")


def validate_probabilities(name: str, probabilities: Any, batch_size: int) -> torch.Tensor:
    """`probabilities` as a `(batch_size,)` float32 tensor of values in [0, 1], or `ValueError` (one line) naming the
    preference when it returned another shape, non-numbers, NaN or a value outside [0, 1]."""
    try:
        tensor = torch.as_tensor(np.asarray(probabilities.detach().cpu() if isinstance(probabilities, torch.Tensor)
                                            else probabilities, dtype=np.float64))
    except (ValueError, TypeError) as e:
        raise ValueError(f"preference {name!r} returned {type(probabilities).__name__} that is not an array of "
                         f"numbers ({e})") from None
    if tensor.shape != (batch_size,):
        raise ValueError(f"preference {name!r} returned shape {tuple(tensor.shape)} for {batch_size} pairs; "
                         f"expected ({batch_size},), one probability per pair")
    outside = torch.nonzero(~((tensor >= 0) & (tensor <= 1))).flatten()  # also catches NaN
    if outside.numel():
        raise ValueError(f"preference {name!r} returned {tensor[outside[0]].item()} for pair {outside[0].item()}; "
                         f"a probability must be in [0, 1]")
    out = tensor.float()
    return out.to(probabilities.device) if isinstance(probabilities, torch.Tensor) else out


def make_preference_fn(name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                       **options: Any) -> PreferenceFn:
    """Build the preference `name` (a registered name, a `module:function` path or a preference server's URL) once;
    the factory receives the `options` its signature names. Its probabilities come back validated (`validate_probabilities`)."""
    check_preference_name(name)
    if name in _FACTORIES or is_url(name):
        factory = _FACTORIES.get(name, remote_preference)
        taken = _factory_options(factory)
        kwargs = {k: v for k, v in options.items() if taken is None or k in taken}
        fn = factory(name, device=device, dtype=dtype, **kwargs) if is_url(name) else factory(
            device=device, dtype=dtype, **kwargs)
    else:
        module_name, fn_name = name.split(":", 1)
        fn = getattr(importlib.import_module(module_name), fn_name)

    def preference_fn(prompts: list[str], outputs_a: Any, outputs_b: Any) -> torch.Tensor:
        if len(outputs_a) != len(prompts) or len(outputs_b) != len(prompts):
            raise ValueError(f"preference {name!r}: {len(prompts)} prompts but {len(outputs_a)} and {len(outputs_b)} "
                             f"outputs; give one output of each side per prompt")
        return validate_probabilities(name, fn(prompts, outputs_a, outputs_b), len(prompts))

    if getattr(fn, "served_kind", None) is not None:  # a preference server's kind, from its /health
        preference_fn.served_kind = fn.served_kind
    return preference_fn


def preference_options(name: str, reward: str = "") -> frozenset[str] | None:
    """The `preference.*` options (without the prefix) that the valid preference `name` takes, None when it takes any;
    `bradley_terry` takes its own and those of its reward spec `reward`, a `module:function` preference none."""
    if name == "bradley_terry":
        inner = reward_options(reward) if reward else frozenset()
        return None if inner is None else inner | {"reward", "temperature"}
    if is_url(name):
        return _factory_options(remote_preference)
    return _factory_options(_FACTORIES[name]) if name in _FACTORIES else frozenset()


def check_preference_config(options: dict[str, Any], policy_kind: str | None = None) -> None:
    """`ValueError` (one line, naming the key) unless the `preference` section `options` (its `name` and options) is
    valid, for a policy producing `policy_kind` outputs when given: a known name, and for `bradley_terry` a valid
    reward spec and a positive temperature. Models are not loaded, servers not contacted."""
    name = options["name"]
    try:
        check_preference_name(name)
    except ValueError as e:
        raise ValueError(f"preference.name: {e}") from None
    if name == "bradley_terry":
        reward, temperature = options.get("reward", ""), options.get("temperature", 1.0)
        if not reward:
            raise ValueError("preference.reward is empty: bradley_terry compares the scores of a reward; name one "
                             "(e.g. preference.reward=large_shape)")
        try:
            check_reward_name(reward)
        except ValueError as e:
            raise ValueError(f"preference.reward: {e}") from None
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"preference.temperature must be a positive number, got {temperature!r}")
    kind = preference_kind(name, options)
    if policy_kind is not None and kind not in ("any", policy_kind):
        raise ValueError(f"preference {name!r} compares {kind} outputs, but the policy produces {policy_kind}")


def _reward_kind_of(options: dict[str, Any]) -> str:
    return reward_kind(options["reward"]) if options.get("reward") else "any"


@register_preference("bradley_terry", kind=_reward_kind_of)
def bradley_terry(device: torch.device | str | None = None, dtype: torch.dtype | None = None, reward: str = "",
                  temperature: float = 1.0, **reward_options: Any) -> PreferenceFn:
    """`P(a beats b) = sigmoid((r(a) - r(b)) / temperature)` for the reward spec `reward` (built once, with the options
    its factories take): the Bradley-Terry model of a scalar reward, so that any reward can judge pairs. A lower
    temperature makes it surer of small score differences."""
    if not reward:
        raise RewardSetupError("bradley_terry: no reward to compare the scores of; set preference.reward")
    reward_fn = make_reward_fn(reward, device=device, dtype=dtype, **reward_options)

    def preference_fn(prompts: list[str], outputs_a: Any, outputs_b: Any) -> torch.Tensor:
        scores_a, scores_b = reward_fn(outputs_a, prompts), reward_fn(outputs_b, prompts)
        return torch.sigmoid((scores_a - scores_b.to(scores_a.device)) / temperature)

    return preference_fn


def section_options(section: Any) -> dict[str, Any]:
    """A config's `preference` section (a `ConfigDict`, or None for a run written before it existed) as a plain dict
    of its name and options, nested sections (the judge's `preference.judge`) as nested dicts."""
    return {"name": "", **(section.to_dict() if section is not None else {})}


def preference_reward(preference_fn: PreferenceFn, group_size: int,
                      comparisons: tuple[tuple[int, int], ...]) -> Callable[[Any, list[str]], torch.Tensor]:
    """A group's comparisons as per-sample rewards: `reward_fn(outputs, prompts) -> (B * k,)` float32 for B groups of
    k = `group_size` outputs stored sample-major (sample j of group g at j * B + g).

    Sample i of a comparison (i, j) is rewarded `l = 2 P(y_i beats y_j) - 1` in [-1, 1] (the paper's Eq. 11): one
    draw of Swamy et al.'s reward `l(x, y_i, pi_t)` when y_j comes from pi_t. A sample that is only compared against
    gets 0, its l against itself. Each comparison is one call of `preference_fn` on the B pairs.
    """

    def reward_fn(outputs: Any, prompts: list[str]) -> torch.Tensor:
        groups = len(prompts) // group_size
        rewards = torch.zeros(len(prompts))
        for i, j in comparisons:
            a, b = slice(i * groups, (i + 1) * groups), slice(j * groups, (j + 1) * groups)
            rewards[a] = 2 * preference_fn(prompts[a], outputs[a], outputs[b]).float().cpu() - 1
        return rewards

    return reward_fn
