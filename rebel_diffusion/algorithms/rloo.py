"""RLOO: REINFORCE with a leave-one-out baseline over k samples per prompt (Kool et al. 2019; the REBEL paper's text
baseline), through PPO's per-step clipped importance ratio `pi / pi_old` against the sampling policy.

The ratio is needed whenever the policy may have moved since sampling: from the second optimizer step of an epoch on
(several steps per epoch), and in every later inner epoch. At ratio 1 (the first step) the clipped objective's gradient
is REINFORCE's, `-A grad ln pi`, so the ratio is always used."""

from __future__ import annotations

import numpy as np
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.base import Algorithm, Stats, require_group_size, require_positive
from rebel_diffusion.algorithms.ppo import clipped_surrogate
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker


def rloo_advantages(rewards: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """`(N, k)` rewards -> `A_i = r_i - mean_{j != i} r_j` within each row (k >= 2)."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (N, k) with k >= 2, got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    others_mean = (rewards.sum(1, keepdims=True) - rewards) / (k - 1) if isinstance(rewards, np.ndarray) \
        else (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return rewards - others_mean


def _targets(rewards: np.ndarray, prompts: list[str], tracker: PerPromptStatTracker, config: ConfigDict) -> np.ndarray:
    return rloo_advantages(rewards)


def _step_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, targets: torch.Tensor, config: ConfigDict,
               inner_epoch: int) -> tuple[torch.Tensor, Stats]:
    # Not plain REINFORCE (-A * log pi) even with one inner epoch: after the epoch's first optimizer step the policy has
    # moved, and its samples are off-policy. At ratio 1 the gradient is REINFORCE's, -A * grad log pi.
    return clipped_surrogate(log_prob - old_log_prob, targets, config.rloo.clip_range)


def _check(config: ConfigDict) -> None:
    require_group_size(config, "rloo.k")
    require_positive(config, "rloo.clip_range")


ALGORITHM = Algorithm(
    name="rloo", group_size=lambda config: config.rloo.k, targets=_targets, kl_in_reward=True, step_loss=_step_loss,
    step_reduction="sum", check=_check,
)
