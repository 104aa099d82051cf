"""The algorithm interface: what the trainer needs to know about an algorithm, as a dataclass of functions.

An algorithm draws `k` samples per prompt (a group), turns the gathered `(N, k)` rewards into per-sample targets, and
defines its loss on a micro-batch of whole groups from per-step log-probs, in one of two shapes:

* `step_loss`: a loss per (sample, step) that needs no other step (PPO, GRPO, RLOO). The trainer backpropagates each
  chunk of steps the policy evaluates in one graph (the LCM chain: one step; a text policy: all tokens) on its own.
* `pair_loss`: a loss of a pair of samples through their whole-trajectory log-ratios `sum_t log pi/pi_t` (REBEL,
  online DPO), depending on the pair only through `log_ratio_a - log_ratio_b`. The trainer accumulates each chunk's
  gradient of `log_ratio_a - log_ratio_b` and scales it once the full log-ratios, hence the loss's derivative, are
  known: the exact gradient with one graph alive at a time and no extra forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker

Stats = dict[str, torch.Tensor]

MU_SOURCES = ("policy", "base", "offline")


@dataclass(frozen=True)
class Mu:
    """Where y', sample 1 of each group, comes from: REBEL's base distribution mu (Algorithm 1 of the paper draws y
    from pi_t and y' from mu). Every other sample of a group comes from the policy.

    Attributes:
        probabilities: `{source: p}` over `MU_SOURCES`, summing to 1: "policy" (pi_t itself), "base" (the base model,
            its adapter disabled) or "offline" (responses from `offline_data`); each group draws its source.
        offline_data: the offline responses' source (`rebel_diffusion.prompts.read_offline_responses`), "" for none.
        offline_key: the config key naming `offline_data`, for errors.
    """

    probabilities: dict[str, float]
    offline_data: str = ""
    offline_key: str = ""


ON_POLICY = Mu({"policy": 1.0})


class StepLoss(Protocol):
    def __call__(self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, targets: torch.Tensor, config: ConfigDict,
                 inner_epoch: int) -> tuple[torch.Tensor, Stats]:
        """`log_prob`, `old_log_prob` `(B, S)` (current with grad, and at sampling); `targets` `(B,)` ->
        the elementwise loss `(B, S)` and elementwise diagnostics `(B, S)` (the trainer averages them over real steps)."""
        ...


class PairLoss(Protocol):
    def __call__(self, log_ratio_a: torch.Tensor, log_ratio_b: torch.Tensor, target_a: torch.Tensor,
                 target_b: torch.Tensor, config: ConfigDict) -> torch.Tensor:
        """`(P,)` whole-trajectory log-ratios and targets of P pairs -> the mean loss over the pairs (a scalar)."""
        ...


@dataclass(frozen=True)
class Algorithm:
    """One learning rule.

    Attributes:
        name: the `config.algorithm` value.
        group_size: `config -> k`, the samples drawn per prompt (1 for PPO, 2 for pair losses).
        targets: `(rewards (N, k), prompts (N,), stat_tracker, config) -> (N, k)` per-sample regression targets or
            advantages, from the rewards of every process (each process then keeps its own rows).
        kl_in_reward: True when `kl_coef` shapes the reward (`r - kl_coef * KL`); False when it is a loss term.
        step_loss / pair_loss: exactly one is set (see the module docstring).
        step_reduction: how a step loss becomes a sample's loss: "mean" over its real steps or "sum".
        check: `config -> None`, raises `ValueError` naming the key of a bad setting; runs before any model loads.
        mu: `config -> Mu`, where y', sample 1 of each group, comes from (on-policy unless the algorithm says).
        comparisons: `((i, j), ...)`: when set, the algorithm learns from a pairwise preference (`preference.name`)
            instead of a reward: sample i of each comparison is rewarded `l = 2 P(y_i beats y_j) - 1` (the paper's
            Eq. 11), a sample only compared against gets 0 (l(y, y) = 0), and a query is a comparison.
        trained_samples: how many of a group's first samples train (None: all); the others are only compared against.
        scale_free: `config -> bool`, whether the targets stay the same when a reward is multiplied by a positive
            constant (they normalise its scale); `reward.aggregate="advantage"` needs it (`aggregate.check_aggregate`).
    """

    name: str
    group_size: Callable[[ConfigDict], int]
    targets: Callable[[np.ndarray, list[str], PerPromptStatTracker, ConfigDict], np.ndarray]
    kl_in_reward: bool
    step_loss: StepLoss | None = None
    pair_loss: PairLoss | None = None
    step_reduction: str = "mean"
    check: Callable[[ConfigDict], None] = lambda config: None
    mu: Callable[[ConfigDict], Mu] = lambda config: ON_POLICY
    comparisons: tuple[tuple[int, int], ...] = ()
    trained_samples: int | None = None
    scale_free: Callable[[ConfigDict], bool] = lambda config: False

    def __post_init__(self) -> None:
        if (self.step_loss is None) == (self.pair_loss is None):
            raise TypeError(f"algorithm {self.name!r} must define exactly one of step_loss and pair_loss")
        if self.step_reduction not in ("mean", "sum"):
            raise TypeError(f"algorithm {self.name!r}: step_reduction must be 'mean' or 'sum'")


def require_positive(config: ConfigDict, key: str, strict: bool = False) -> None:
    """Raise `ValueError` naming `key` (dotted) when its value is negative (or not positive, with `strict`)."""
    value = config
    for part in key.split("."):
        value = value[part]
    if value < 0 or (strict and value == 0):
        raise ValueError(f"{key} must be {'positive' if strict else 'non-negative'}, got {value}")


def require_group_size(config: ConfigDict, key: str) -> None:
    """A group algorithm needs at least two samples per prompt to compare."""
    value = config
    for part in key.split("."):
        value = value[part]
    if not isinstance(value, int) or value < 2:
        raise ValueError(f"{key} must be an integer of at least 2 (samples per prompt to compare), got {value!r}")
