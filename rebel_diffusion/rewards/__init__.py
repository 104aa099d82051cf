"""Reward functions: `reward_fn(images, prompts) -> (B,)` scores, looked up by name.

`images` is a float tensor `(B, 3, H, W)` in [0, 1] on any device; `prompts` a list of B strings. A reward is built by
a factory `factory(device=..., dtype=..., **options) -> reward_fn`, so that heavy scorers (a CLIP model) are created
once per process on that process's device. A `module:function` path names a user reward function directly.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


class RewardSetupError(RuntimeError):
    """A reward could not be built (missing or corrupt weights, no network); its message is one line for the user."""

RewardFactory = Callable[..., RewardFn]

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


def reward_kind(name: str) -> str:
    """What a registered reward scores ("image", "text" or "any"); a `module:function` path is "any"."""
    return _KINDS.get(name, "any")


def available_rewards() -> list[str]:
    """Names of the registered rewards."""
    return sorted(_FACTORIES)


def check_reward_name(name: str) -> None:
    """Raise `ValueError` with one readable line if `name` is neither registered nor an importable `module:function`."""
    if name in _FACTORIES:
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


def make_reward_fn(
    name: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **options
) -> RewardFn:
    """Build the reward called `name` (a registered name or a `module:function` path).

    `options` holds every reward option of the config; each factory receives the ones its signature names.
    """
    check_reward_name(name)
    if name in _FACTORIES:
        factory = _FACTORIES[name]
        accepted = inspect.signature(factory).parameters
        return factory(device=device, dtype=dtype, **{k: v for k, v in options.items() if k in accepted})
    module_name, fn_name = name.split(":", 1)
    fn = getattr(importlib.import_module(module_name), fn_name)
    return _wrap_trl_signature(fn) if _has_trl_signature(fn) else fn


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
from rebel_diffusion.rewards import aesthetic, jpeg, shape_fidelity, text  # noqa: E402,F401
