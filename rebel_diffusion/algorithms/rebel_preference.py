"""Preference REBEL (Appendix D of the paper): REBEL's regression on a pairwise preference instead of a reward.

Each prompt draws three samples: y and y'' from pi_t, y' from mu (`rebel.mu`; pi_t unless set). A preference model
l(x, a, b) = 2 P(a beats b | x) - 1 (`preference.name`) scores y and y' against y'', and REBEL regresses
`(1/eta)(ln pi/pi_t(y) - ln pi/pi_t(y'))` onto `l(x, y, y'') - l(x, y', y'')`. In expectation over y'' that is
Swamy et al.'s iteration-dependent reward `r_t(x, y) = l(x, y, pi_t)`, whose exact mirror descent converges to the
minimax winner, also for an intransitive preference (tests/test_rebel.py checks it on rock-paper-scissors). y'' is
only the comparison: it is not trained on. Two preference queries per prompt; `rebel.*` configures it as REBEL.
"""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

from rebel_diffusion.algorithms import rebel
from rebel_diffusion.algorithms.base import Algorithm
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker

COMPARISONS = ((0, 2), (1, 2))  # y against y'', y' against y''


def _targets(rewards: np.ndarray, prompts: list[str], tracker: PerPromptStatTracker, config: ConfigDict) -> np.ndarray:
    """`rewards` `(N, 3)`: l(y, y''), l(y', y'') and y'''s own 0 -> REBEL's targets of y and y' (`rebel.target`),
    and 0 for y'', which does not train."""
    return np.concatenate([rebel.ALGORITHM.targets(rewards[:, :2], prompts, tracker, config),
                           np.zeros_like(rewards[:, 2:])], axis=1)


ALGORITHM = Algorithm(
    name="rebel_preference", group_size=lambda config: 3, targets=_targets, kl_in_reward=True,
    pair_loss=rebel.ALGORITHM.pair_loss, check=rebel.ALGORITHM.check, mu=rebel.ALGORITHM.mu, comparisons=COMPARISONS,
    trained_samples=2,
)
