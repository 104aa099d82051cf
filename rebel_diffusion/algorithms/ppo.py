"""The clipped policy-gradient surrogate of DDPO/RLCM (called PPO in the REBEL paper: no critic, no GAE)."""

from __future__ import annotations

import torch


def ppo_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float, adv_clip_max: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's clipped surrogate.

    Args:
        log_ratio: `(B,)` `log pi_theta(a_t|s_t) - log pi_old(a_t|s_t)` for one step t.
        advantages: `(B,)` per-trajectory advantages.
        clip_range: the ratio is clipped to `[1 - clip_range, 1 + clip_range]`.
        adv_clip_max: advantages are clipped to `[-adv_clip_max, adv_clip_max]`.

    Returns:
        The loss `mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))` and detached diagnostics: `approx_kl`
        (`0.5 * mean(log_ratio ** 2)`) and `clipfrac` (the fraction of ratios outside the clip range).
    """
    advantages = advantages.to(log_ratio.dtype).clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    info = {
        "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
    }
    return loss, info
