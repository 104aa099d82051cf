"""Online DPO (the REBEL paper's Algorithm 2, Eq. 20): two fresh samples per prompt, the better one by reward is the
chosen one, and the DPO loss on their log-ratios against the sampling policy pi_t, exactly as REBEL's."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.base import Algorithm, require_positive
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker


def online_dpo_loss(
    log_ratio_a: torch.Tensor, log_ratio_b: torch.Tensor, reward_a: torch.Tensor, reward_b: torch.Tensor, beta: float
) -> torch.Tensor:
    """Mean over pairs of `-log sigmoid(beta * (log_ratio_a - log_ratio_b) * sign(reward_a - reward_b))`.

    Args:
        log_ratio_a, log_ratio_b: `(P,)` whole-trajectory `sum_t [log pi_theta - log pi_t]` of each pair's samples.
        reward_a, reward_b: `(P,)` their rewards; only the sign of the difference is used. A tie gives the constant
            `log 2` and no gradient.
        beta: the DPO temperature.
    """
    if log_ratio_a.dim() != 1 or log_ratio_a.shape != log_ratio_b.shape:
        raise ValueError(f"log ratios must both be (P,), got {tuple(log_ratio_a.shape)} and {tuple(log_ratio_b.shape)}")
    sign = torch.sign(reward_a - reward_b).to(log_ratio_a.dtype)
    return -F.logsigmoid(beta * (log_ratio_a - log_ratio_b) * sign).mean()


def _targets(rewards: np.ndarray, prompts: list[str], tracker: PerPromptStatTracker, config: ConfigDict) -> np.ndarray:
    return rewards


def _pair_loss(log_ratio_a: torch.Tensor, log_ratio_b: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor,
               config: ConfigDict) -> torch.Tensor:
    return online_dpo_loss(log_ratio_a, log_ratio_b, target_a, target_b, config.dpo.beta)


def _check(config: ConfigDict) -> None:
    require_positive(config, "dpo.beta", strict=True)


ALGORITHM = Algorithm(
    name="online_dpo", group_size=lambda config: 2, targets=_targets, kl_in_reward=True, pair_loss=_pair_loss,
    check=_check,
)
