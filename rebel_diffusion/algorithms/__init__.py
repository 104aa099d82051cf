"""Losses and reward statistics: pure functions of tensors (and one small stateful tracker)."""

from rebel_diffusion.algorithms.ppo import ppo_loss
from rebel_diffusion.algorithms.rebel import rebel_loss, regression_targets
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker

__all__ = ["PerPromptStatTracker", "ppo_loss", "rebel_loss", "regression_targets"]
