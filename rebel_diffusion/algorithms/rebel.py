"""REBEL's least-squares regression of relative rewards (Gao et al. 2024, Eq. 1)."""

from __future__ import annotations

import numpy as np
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.base import MU_SOURCES, Algorithm, Mu, require_positive
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker


def rebel_loss(
    log_ratio_a: torch.Tensor,
    log_ratio_b: torch.Tensor,
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
    eta: float,
) -> torch.Tensor:
    """Mean over pairs of `((1/eta) * (log_ratio_a - log_ratio_b) - (reward_a - reward_b)) ** 2`.

    Args:
        log_ratio_a: `(B,)` per-trajectory `sum_t [log pi_theta - log pi_theta_t]` of the first completion of each pair.
        log_ratio_b: `(B,)` the same for the second completion.
        reward_a: `(B,)` regression target of the first completion (reward or advantage).
        reward_b: `(B,)` the same for the second.
        eta: REBEL's step size; 1/eta scales the log-ratio difference.

    Returns:
        A scalar: the mean squared residual over the B pairs. Each pair's log-ratio is its own sum over steps; nothing
        is summed across the batch.
    """
    if log_ratio_a.dim() != 1 or log_ratio_a.shape != log_ratio_b.shape:
        raise ValueError(f"log ratios must both be (B,), got {tuple(log_ratio_a.shape)} and {tuple(log_ratio_b.shape)}")
    residual = (log_ratio_a - log_ratio_b) / eta - (reward_a - reward_b).to(log_ratio_a.dtype)
    return residual.pow(2).mean()


def regression_targets(rewards: np.ndarray, advantages: np.ndarray, target: str) -> np.ndarray:
    """What REBEL regresses onto, per trajectory: `"advantages"` (per-prompt z-scores from the stat tracker),
    `"batch_zscore"` (z-scored over the whole gathered batch) or `"rewards"` (raw rewards)."""
    if target == "advantages":
        return advantages
    if target == "batch_zscore":
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    if target == "rewards":
        return rewards
    raise ValueError(f"unknown REBEL target {target!r}; choose 'advantages', 'batch_zscore' or 'rewards'")


def _targets(rewards: np.ndarray, prompts: list[str], tracker: PerPromptStatTracker, config: ConfigDict) -> np.ndarray:
    flat_rewards, flat_prompts = rewards.reshape(-1), [p for p in prompts for _ in range(rewards.shape[1])]
    advantages = tracker.update(flat_prompts, flat_rewards)
    return regression_targets(flat_rewards, advantages, config.rebel.target).reshape(rewards.shape)


def _pair_loss(log_ratio_a: torch.Tensor, log_ratio_b: torch.Tensor, target_a: torch.Tensor, target_b: torch.Tensor,
               config: ConfigDict) -> torch.Tensor:
    return rebel_loss(log_ratio_a, log_ratio_b, target_a, target_b, config.rebel.eta)


def _mu(config: ConfigDict) -> Mu:
    """`rebel.mu`: y' from "policy" (pi_t), "base", "offline" (`rebel.offline_data`) or a "mix" of them (`rebel.mix`)."""
    probabilities = dict(config.rebel.mix) if config.rebel.mu == "mix" else {config.rebel.mu: 1.0}
    return Mu({source: float(p) for source, p in probabilities.items() if p > 0}, config.rebel.offline_data,
              "rebel.offline_data")


def _check(config: ConfigDict) -> None:
    require_positive(config, "rebel.eta", strict=True)
    if config.rebel.target not in ("advantages", "batch_zscore", "rewards"):
        raise ValueError(f"rebel.target must be 'advantages', 'batch_zscore' or 'rewards', got {config.rebel.target!r}")
    if config.rebel.mu not in (*MU_SOURCES, "mix"):
        raise ValueError(f"rebel.mu must be one of {[*MU_SOURCES, 'mix']}, got {config.rebel.mu!r}")
    if config.rebel.mu == "mix":
        mix = dict(config.rebel.mix)
        if set(mix) - set(MU_SOURCES) or any(not p >= 0 for p in mix.values()) or abs(sum(mix.values()) - 1) > 1e-6:
            raise ValueError(f"rebel.mix must give non-negative probabilities of {list(MU_SOURCES)} summing to 1, "
                             f"got {mix}")
    uses_offline = _mu(config).probabilities.get("offline", 0) > 0
    if uses_offline and not config.rebel.offline_data:
        raise ValueError("rebel.mu draws offline responses: set rebel.offline_data (a .jsonl file with 'prompt' and "
                         "'response' fields, or a dataset 'hub-id:split:prompt_column:response_column')")
    if config.rebel.offline_data and not uses_offline:
        raise ValueError(f"rebel.offline_data is set but rebel.mu={config.rebel.mu!r} draws no offline responses")


ALGORITHM = Algorithm(
    name="rebel", group_size=lambda config: 2, targets=_targets, kl_in_reward=True, pair_loss=_pair_loss, check=_check,
    mu=_mu,
    # per-prompt or batch z-scores; raw rewards keep their scale
    scale_free=lambda config: config.rebel.target != "rewards",
)
