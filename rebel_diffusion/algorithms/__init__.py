"""What learns: losses, advantages and the stat tracker as pure functions of tensors, and each algorithm's `Algorithm`
record (rebel_diffusion.algorithms.base) that the trainer drives. Adding an algorithm means one file here and its entry
in `ALGORITHMS`."""

from rebel_diffusion.algorithms import grpo, online_dpo, ppo, rebel, rebel_preference, rloo
from rebel_diffusion.algorithms.base import Algorithm
from rebel_diffusion.algorithms.grpo import group_advantages
from rebel_diffusion.algorithms.online_dpo import online_dpo_loss
from rebel_diffusion.algorithms.ppo import clipped_surrogate, ppo_loss
from rebel_diffusion.algorithms.rebel import rebel_loss, regression_targets
from rebel_diffusion.algorithms.rloo import rloo_advantages
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker

ALGORITHMS: dict[str, Algorithm] = {m.ALGORITHM.name: m.ALGORITHM for m in (rebel, ppo, rloo, grpo, online_dpo, rebel_preference)}

__all__ = [
    "ALGORITHMS", "Algorithm", "PerPromptStatTracker", "clipped_surrogate", "group_advantages", "online_dpo_loss",
    "ppo_loss", "rebel_loss", "regression_targets", "rloo_advantages",
]
