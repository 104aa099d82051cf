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


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering `factory(device=None, dtype=None, **options) -> reward_fn` under `name`."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        _FACTORIES[name] = factory
        return factory

    return wrap


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
    return getattr(importlib.import_module(module_name), fn_name)


# Importing the modules registers their rewards.
from rebel_diffusion.rewards import aesthetic, jpeg  # noqa: E402,F401
