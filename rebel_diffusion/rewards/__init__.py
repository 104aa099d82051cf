"""Reward functions: `reward_fn(images, prompts) -> (B,)` scores, looked up by name.

`images` is a float tensor `(B, 3, H, W)` in [0, 1] on any device; `prompts` a list of B strings. A reward is built by
a factory `factory(device=..., dtype=..., **options) -> reward_fn`, so that heavy scorers (a CLIP model) are created
once per process on that process's device. A `module:function` path names a user reward function directly; a URL
`http://host:port` a reward served by another process (`rebel_diffusion.serve_reward`; the client is
`rebel_diffusion.rewards.remote`).

A reward function that draws random numbers takes a keyword `generator` (`reward_fn(outputs, prompts, generator=None)`):
the trainer then passes a `torch.Generator` seeded from the run's seed, the process, the epoch and the sampling batch,
so that its draws do not depend on what else runs at the same time (`call_reward`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import torch

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


class RewardSetupError(RuntimeError):
    """A reward could not be built (missing or corrupt weights, no network); its message is one line for the user."""

RewardFactory = Callable[..., RewardFn]

_REAL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

_FACTORIES: dict[str, RewardFactory] = {}
_KINDS: dict[str, str] = {}


def register_reward(name: str, kind: str = "image") -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering `factory(device=None, dtype=None, **options) -> reward_fn` under `name`.

    `kind` is what the reward scores: "image" (`(B, 3, H, W)` tensors), "text" (lists of strings) or "any".
    """

    def wrap(factory: RewardFactory) -> RewardFactory:
        _FACTORIES[name] = factory
        _KINDS[name] = kind
        return factory

    return wrap


def available_rewards() -> list[str]:
    """Names of the registered rewards."""
    return sorted(_FACTORIES)


def reward_kind(spec: str) -> str:
    """What a reward spec scores ("image", "text" or "any"); a `module:function` path is "any".

    For a weighted list, the common kind of its components ("any" components fit either); `ValueError` when the list
    mixes image and text rewards.
    """
    if spec in _FACTORIES or "," not in spec and ":" not in spec:
        return _KINDS.get(spec, "any")
    kinds = {_KINDS.get(name, "any") for name, _ in _split_spec(spec)} - {"any"}
    if len(kinds) > 1:
        raise ValueError(f"reward {spec!r} mixes image and text rewards; all its components must score the same outputs")
    return kinds.pop() if kinds else "any"


def _parse_weight(text: str, component: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"reward {component!r}: weight {text!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"reward {component!r}: weight {text!r} is not a finite number")
    return weight


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def is_url(name: str) -> bool:
    """Whether a reward name is a reward server's URL (`http://host:port`, served by `rebel_diffusion.serve_reward`)."""
    return name.strip().startswith(("http://", "https://"))


def _has_port(url: str) -> bool:
    try:
        return urlsplit(url).port is not None
    except ValueError:
        return False


def _split_spec(spec: str) -> list[tuple[str, float]]:
    """Syntax only: `spec` -> [(name, weight)], names not yet checked.

    A component is `name`, `name:weight`, `module:function`, `module:function:weight`, a reward server's URL or
    `URL:weight` (when the URL gives its port). A single colon is read as a
    weight when the part before it is a registered reward or the part after it is a number (a function name never is);
    two colons always end in a weight.
    """
    components = [c.strip() for c in spec.split(",")]
    if not spec.strip() or any(not c for c in components):
        raise ValueError(f"reward spec {spec!r} has an empty component; write 'name' or 'name:weight', comma-separated")
    parsed = []
    for component in components:
        if is_url(component):
            # A reward server: `http://host:port`, weighted as `http://host:port:weight` (the port must be given).
            head, _, tail = component.rpartition(":")
            parsed.append((head.strip(), _parse_weight(tail.strip(), component)) if _has_port(head) and
                          _looks_like_number(tail) else (component, 1.0))
            continue
        if component in _FACTORIES:
            parsed.append((component, 1.0))
            continue
        head, sep, tail = component.rpartition(":")
        if sep and (head.count(":") == 1 or head in _FACTORIES or _looks_like_number(tail)):
            parsed.append((head.strip(), _parse_weight(tail.strip(), component)))
        else:
            parsed.append((component, 1.0))
    return parsed


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """`"aesthetic:1.0,shape_fidelity:0.5"` -> `[("aesthetic", 1.0), ("shape_fidelity", 0.5)]`.

    A component without a weight weighs 1.0. Raises `ValueError` (one line) for an unknown reward, a weight that is not
    a finite number, a reward listed twice, or a list mixing image and text rewards.
    """
    parsed = _split_spec(spec)
    names = [name for name, _ in parsed]
    for name in names:
        _check_single_name(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"reward spec {spec!r} lists {duplicates[0]!r} more than once; give it one weight")
    reward_kind(spec)
    return parsed


def _check_single_name(name: str) -> None:
    if name in _FACTORIES:
        return
    if is_url(name):
        remote.check_url(name)
        return
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; choose one of {available_rewards()} or give a 'module:function' path")
    module_name, fn_name = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from None
    if not callable(getattr(module, fn_name, None)):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {fn_name!r}")


def check_reward_name(name: str) -> None:
    """Raise `ValueError` with one readable line unless `name` is a valid reward spec: a registered name, an importable
    `module:function`, a reward server's URL (not contacted here), or a comma-separated list of those with optional
    `:weight`s (see `parse_reward_spec`)."""
    parse_reward_spec(name)


def _factory_options(factory: RewardFactory) -> frozenset[str] | None:
    """The options a factory takes: its keyword parameters but `device` and `dtype`; None for `**options` (any)."""
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.name not in ("device", "dtype")
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def reward_options(spec: str) -> frozenset[str] | None:
    """The `reward.*` options (without the prefix) that the rewards of a valid spec take, None when one takes any; a
    `module:function` reward takes none (it is called as is)."""
    options: set[str] = set()
    for name, _ in parse_reward_spec(spec):
        taken = (_factory_options(_FACTORIES[name]) if name in _FACTORIES else
                 _factory_options(remote.remote_reward) if is_url(name) else frozenset())
        if taken is None:
            return None
        options |= taken
    return frozenset(options)


def rewards_taking(option: str) -> list[str]:
    """The registered rewards that take `option`, and "http://host:port" when a reward server's client takes it."""
    names = [name for name in available_rewards() if option in (_factory_options(_FACTORIES[name]) or ())]
    return names + (["http://host:port"] if option in _factory_options(remote.remote_reward) else [])


def validate_scores(name: str, scores: Any, batch_size: int) -> torch.Tensor:
    """`scores` as a `(batch_size,)` float32 tensor, or `ValueError` naming the reward when it returned something else
    (a wrong shape or length, strings, None, complex numbers)."""
    if isinstance(scores, torch.Tensor):
        if scores.dtype.is_complex or scores.dtype not in _REAL_DTYPES and not scores.is_floating_point():
            raise ValueError(f"reward {name!r} returned a tensor of dtype {scores.dtype}; expected real numbers")
        tensor = scores
    else:
        try:
            array = np.asarray(scores)
        except (ValueError, TypeError) as e:
            raise ValueError(f"reward {name!r} returned {type(scores).__name__} that is not an array of numbers ({e})") from None
        if array.dtype.kind not in "biuf":
            raise ValueError(f"reward {name!r} returned {type(scores).__name__} of {array.dtype} values; expected numbers")
        tensor = torch.from_numpy(array)
    if tensor.shape != (batch_size,):
        raise ValueError(f"reward {name!r} returned shape {tuple(tensor.shape)} for {batch_size} outputs; "
                         f"expected ({batch_size},), one score per output")
    return tensor.float()


def takes_generator(fn: Callable) -> bool:
    """Whether `fn` accepts a keyword argument named `generator` (a reward that draws random numbers)."""
    try:
        parameter = inspect.signature(fn).parameters.get("generator")
    except (TypeError, ValueError):  # a builtin or a C extension without a signature
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def call_reward(fn: Callable, outputs: Any, prompts: list[str], generator: torch.Generator | None = None) -> Any:
    """`fn(outputs, prompts)`, with `generator=generator` when one is given and `fn` takes it."""
    if generator is not None and takes_generator(fn):
        return fn(outputs, prompts, generator=generator)
    return fn(outputs, prompts)


def _validated(name: str, fn: RewardFn) -> RewardFn:
    """`fn` whose scores are checked by `validate_scores` (and returned as float32) at every call; a `generator` is
    passed on when `fn` takes one."""

    def reward_fn(outputs: Any, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        return validate_scores(name, call_reward(fn, outputs, prompts, generator), len(prompts))

    if getattr(fn, "served_kind", None) is not None:  # a reward server's kind, from its /health
        reward_fn.served_kinds = {name: fn.served_kind}
    return reward_fn


def served_kinds(reward_fn: Any) -> dict[str, str]:
    """What each reward server among a built reward's components said it scores, by URL: `{url: kind}`."""
    kinds = dict(getattr(reward_fn, "served_kinds", {}))
    for fn in getattr(reward_fn, "_fns", []):
        kinds.update(getattr(fn, "served_kinds", {}))
    return kinds


def _make_single(name: str, device: torch.device | str | None, dtype: torch.dtype | None, options: dict) -> RewardFn:
    """Build one registered reward, reward server (its client, which asks its `/health`) or `module:function`, its
    outputs validated."""
    if name in _FACTORIES or is_url(name):
        factory = _FACTORIES.get(name, remote.remote_reward)
        accepted = inspect.signature(factory).parameters
        kwargs = {k: v for k, v in options.items() if k in accepted and k != "url"}
        fn = factory(name, device=device, dtype=dtype, **kwargs) if is_url(name) else factory(
            device=device, dtype=dtype, **kwargs)
    else:
        module_name, fn_name = name.split(":", 1)
        fn = getattr(importlib.import_module(module_name), fn_name)
        fn = _wrap_trl_signature(fn) if _has_trl_signature(fn) else fn
    return _validated(name, fn)


class WeightedReward:
    """`sum_i w_i * reward_i(outputs, prompts)` over the components of a reward spec, float32 `(B,)`.

    Attributes:
        names: the components' names, in spec order.
        weights: their weights.
        last_components: each component's raw (unweighted) `(B,)` scores from the last call, for logging.
    """

    def __init__(self, components: list[tuple[str, float, RewardFn]]) -> None:
        self.names = [name for name, _, _ in components]
        self.weights = [weight for _, weight, _ in components]
        self._fns = [fn for _, _, fn in components]
        self.last_components: dict[str, torch.Tensor] = {}

    def __call__(self, outputs: Any, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        # One generator, drawn from by the components in spec order: deterministic as long as the order is.
        scores = [call_reward(fn, outputs, prompts, generator) for fn in self._fns]
        self.last_components = dict(zip(self.names, scores))
        if len(scores) == 1 and self.weights[0] == 1.0:
            # A lone unweighted reward is returned as is, bit for bit.
            return scores[0]
        # Components may score on different devices (a CLIP model on the GPU, JPEG sizes on the CPU): sum on the first's.
        device = scores[0].device
        return sum(weight * score.to(device) for weight, score in zip(self.weights, scores))


def make_weighted_reward(
    spec: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **options: Any
) -> WeightedReward:
    """Build every component of `spec` (see `parse_reward_spec`) once, as a `WeightedReward`; each component's factory
    receives the `options` its signature names."""
    return WeightedReward([(name, weight, _make_single(name, device, dtype, options))
                           for name, weight in parse_reward_spec(spec)])


def make_reward_fn(
    name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **options: Any
) -> RewardFn:
    """Build the reward `name`: a registered name or a `module:function` path, or a weighted list of them (then a
    `WeightedReward`). Scores come back as a validated float32 `(B,)` tensor.

    `options` holds every reward option of the config; each factory receives the ones its signature names.
    """
    parsed = parse_reward_spec(name)
    if len(parsed) == 1 and parsed[0] == (name, 1.0):
        return _make_single(name, device, dtype, options)
    return make_weighted_reward(name, device=device, dtype=dtype, **options)


def _has_trl_signature(fn: Callable) -> bool:
    """Whether `fn` is a TRL-style reward: `fn(prompts=..., completions=..., **kwargs) -> list[float]`."""
    parameters = inspect.signature(fn).parameters
    return "prompts" in parameters and "completions" in parameters


def _wrap_trl_signature(fn: Callable) -> RewardFn:
    """Adapt a TRL-style reward to `reward_fn(outputs, prompts) -> (B,)` float32."""

    def reward_fn(outputs: list[str], prompts: list[str]) -> torch.Tensor:
        return torch.as_tensor(fn(prompts=list(prompts), completions=list(outputs)), dtype=torch.float32)

    return reward_fn


# Importing the modules registers their rewards.
# judge.py also registers the pairwise judge among the preferences.
from rebel_diffusion.rewards import aesthetic, alignment, jpeg, judge, remote, shape_fidelity, text  # noqa: E402,F401
