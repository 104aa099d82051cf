"""Pairwise preference rewards: `preference_fn(prompts, outputs_a, outputs_b) -> (B,)` probabilities that a beats b.

A preference compares two outputs of the same prompt instead of scoring one: `P(a beats b | prompt)` in [0, 1], float32
`(B,)`. It is what REBEL's preference extension regresses on (`l(x, y, y'')`, Appendix D of the paper) and what
`python -m rebel_diffusion.sample --compare-base` turns into a win rate against the base model.

Like a reward, a preference is built by a factory `factory(device=..., dtype=..., **options) -> preference_fn`,
registered by name (`register_preference`), or named as a `module:function` path to a user function with the same
signature. Outputs are what the policy produces: images `(B, 3, H, W)` in [0, 1] or lists of strings.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import numpy as np
import torch

PreferenceFn = Callable[[list[str], Any, Any], torch.Tensor]
PreferenceFactory = Callable[..., PreferenceFn]

_FACTORIES: dict[str, PreferenceFactory] = {}
_KINDS: dict[str, str] = {}


def register_preference(name: str, kind: str = "image") -> Callable[[PreferenceFactory], PreferenceFactory]:
    """Decorator registering `factory(device=None, dtype=None, **options) -> preference_fn` under `name`; `kind` is
    what it compares: "image", "text" or "any"."""

    def wrap(factory: PreferenceFactory) -> PreferenceFactory:
        _FACTORIES[name] = factory
        _KINDS[name] = kind
        return factory

    return wrap


def available_preferences() -> list[str]:
    """Names of the registered preferences."""
    return sorted(_FACTORIES)


def preference_kind(name: str) -> str:
    """What a preference compares ("image", "text" or "any"); a `module:function` path is "any"."""
    return _KINDS.get(name, "any")


def check_preference_name(name: str) -> None:
    """`ValueError` (one line) unless `name` is a registered preference or an importable `module:function`."""
    if name in _FACTORIES:
        return
    if ":" not in name:
        raise ValueError(f"unknown preference {name!r}; choose one of {available_preferences()} or give a "
                         f"'module:function' path")
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
    """Build the preference `name` (a registered name or a `module:function` path) once; the factory receives the
    `options` its signature names. Its probabilities come back validated (`validate_probabilities`)."""
    check_preference_name(name)
    if name in _FACTORIES:
        factory = _FACTORIES[name]
        parameters = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        fn = factory(device=device, dtype=dtype,
                     **{k: v for k, v in options.items() if takes_any or k in parameters})
    else:
        module_name, fn_name = name.split(":", 1)
        fn = getattr(importlib.import_module(module_name), fn_name)

    def preference_fn(prompts: list[str], outputs_a: Any, outputs_b: Any) -> torch.Tensor:
        if len(outputs_a) != len(prompts) or len(outputs_b) != len(prompts):
            raise ValueError(f"preference {name!r}: {len(prompts)} prompts but {len(outputs_a)} and {len(outputs_b)} "
                             f"outputs; give one output of each side per prompt")
        return validate_probabilities(name, fn(prompts, outputs_a, outputs_b), len(prompts))

    return preference_fn


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
