"""The clipped policy-gradient surrogate of DDPO/RLCM (called PPO in the REBEL paper: no critic, no GAE)."""

from __future__ import annotations

import numpy as np
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.base import Algorithm, Stats, require_positive
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, Stats]:
    """Elementwise `max(-A * r, -A * clip(r, 1 - eps, 1 + eps))` with `r = exp(log_ratio)`.

    Args:
        log_ratio: `(B,)` or `(B, S)` `log pi_theta(a_t|s_t) - log pi_old(a_t|s_t)`.
        advantages: `(B,)` per-trajectory advantages, broadcast over steps.
        clip_range: eps.

    Returns:
        The loss, shaped like `log_ratio`, and detached elementwise diagnostics `approx_kl` (`0.5 * log_ratio ** 2`)
        and `clipfrac` (1 where the ratio is outside the clip range).
    """
    advantages = advantages.to(log_ratio.dtype)
    if log_ratio.dim() == 2:
        advantages = advantages[:, None]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    info = {
        "approx_kl": 0.5 * log_ratio.detach().pow(2),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float(),
    }
    return torch.maximum(unclipped, clipped), info


def ppo_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float, adv_clip_max: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's clipped surrogate, averaged over the batch.

    Args:
        log_ratio: `(B,)` `log pi_theta(a_t|s_t) - log pi_old(a_t|s_t)` for one step t.
        advantages: `(B,)` per-trajectory advantages.
        clip_range: the ratio is clipped to `[1 - clip_range, 1 + clip_range]`.
        adv_clip_max: advantages are clipped to `[-adv_clip_max, adv_clip_max]`.

    Returns:
        The loss `mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))` and detached diagnostics: `approx_kl`
        (`0.5 * mean(log_ratio ** 2)`) and `clipfrac` (the fraction of ratios outside the clip range).
    """
    loss, info = clipped_surrogate(log_ratio, advantages.clamp(-adv_clip_max, adv_clip_max), clip_range)
    return loss.mean(), {k: v.mean() for k, v in info.items()}


def _targets(rewards: np.ndarray, prompts: list[str], tracker: PerPromptStatTracker, config: ConfigDict) -> np.ndarray:
    return tracker.update(prompts, rewards[:, 0])[:, None]


def _step_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, targets: torch.Tensor, config: ConfigDict,
               inner_epoch: int) -> tuple[torch.Tensor, Stats]:
    advantages = targets.clamp(-config.ppo.adv_clip_max, config.ppo.adv_clip_max)
    return clipped_surrogate(log_prob - old_log_prob, advantages, config.ppo.clip_range)


def _check(config: ConfigDict) -> None:
    require_positive(config, "ppo.clip_range")
    require_positive(config, "ppo.adv_clip_max")


ALGORITHM = Algorithm(
    name="ppo", group_size=lambda config: 1, targets=_targets, kl_in_reward=False, step_loss=_step_loss,
    step_reduction="mean", check=_check,
    # per-prompt z-scores
    scale_free=lambda config: True,
)
