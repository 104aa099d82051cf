"""RLOO: REINFORCE with a leave-one-out baseline over k samples per prompt (Kool et al. 2019; the REBEL paper's text
baseline). One inner epoch is plain REINFORCE; more inner epochs reuse the samples through PPO's clipped ratio."""

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
    log_ratio = log_prob - old_log_prob
    if config.train.num_inner_epochs == 1:
        # -A * log pi: the REINFORCE gradient; the samples are used once, so no importance ratio is needed.
        info = {"approx_kl": 0.5 * log_ratio.detach().pow(2)}
        return -targets.to(log_prob.dtype)[:, None] * log_prob, info
    return clipped_surrogate(log_ratio, targets, config.rloo.clip_range)


def _check(config: ConfigDict) -> None:
    require_group_size(config, "rloo.k")
    require_positive(config, "rloo.clip_range")


ALGORITHM = Algorithm(
    name="rloo", group_size=lambda config: config.rloo.k, targets=_targets, kl_in_reward=True, step_loss=_step_loss,
    step_reduction="sum", check=_check,
)
