"""GRPO: group-relative advantages (as flow_grpo and DanceGRPO) with the per-step clipped-ratio objective of PPO."""

from __future__ import annotations

import numpy as np
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.base import Algorithm, Stats, require_group_size, require_positive
from rebel_diffusion.algorithms.ppo import clipped_surrogate
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker


def group_advantages(rewards: np.ndarray | torch.Tensor, eps: float) -> np.ndarray | torch.Tensor:
    """`(N, k)` rewards of k samples per prompt -> `(r_i - mean_group) / (std_group + eps)`, std with ddof 0."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (N, k), got shape {tuple(rewards.shape)}")
    if isinstance(rewards, torch.Tensor):
        return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, correction=0, keepdim=True) + eps)
    return (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + eps)


def _targets(rewards: np.ndarray, prompts: list[str], tracker: PerPromptStatTracker, config: ConfigDict) -> np.ndarray:
    return group_advantages(rewards, config.grpo.eps)


def _step_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, targets: torch.Tensor, config: ConfigDict,
               inner_epoch: int) -> tuple[torch.Tensor, Stats]:
    advantages = targets.clamp(-config.grpo.adv_clip_max, config.grpo.adv_clip_max)
    return clipped_surrogate(log_prob - old_log_prob, advantages, config.grpo.clip_range)


def _check(config: ConfigDict) -> None:
    require_group_size(config, "grpo.k")
    require_positive(config, "grpo.clip_range")
    require_positive(config, "grpo.adv_clip_max")
    require_positive(config, "grpo.eps")


ALGORITHM = Algorithm(
    name="grpo", group_size=lambda config: config.grpo.k, targets=_targets, kl_in_reward=False, step_loss=_step_loss,
    step_reduction="mean", check=_check,
    # z-scores within each group
    scale_free=lambda config: True,
)
