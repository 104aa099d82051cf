"""How a weighted reward's components become one target per sample: `reward.aggregate`.

* "sum" (the default): the algorithm's targets of the weighted total `sum_i w_i r_i`, with one stat tracker.
* "advantage": `sum_i w_i T(r_i)`, where `T` is the algorithm's own target rule applied to each component alone, with
  a stat tracker of its own. Each component is normalised (per prompt or per group) before its weight applies, so a
  reward on a scale of 1000 cannot drown one on a scale of 1: the weights, not the scales, say how much each counts.

"advantage" is refused (`check_aggregate`, before any model loads) where it could not do what it says:

* with an algorithm whose targets are linear in the reward (RLOO's leave-one-out differences, online DPO's raw
  rewards, REBEL with `rebel.target="rewards"`): there `sum_i w_i T(r_i) = T(sum_i w_i r_i)`, the same as "sum", and
  the run would silently keep the scale problem it was asked to remove;
* with `kl_coef > 0` for an algorithm that puts the KL in the reward (`r - kl_coef * KL`, REBEL): `kl_coef` is measured
  in the reward's unit, and normalised components have none. Normalising the KL as one more component would silently
  turn `kl_coef` from the KL-regularised objective's coefficient into a relative weight, with another meaning than
  under "sum"; shaping each component would count the KL once per component, each time at that component's scale.
  PPO and GRPO take the KL as a loss term, untouched by how the targets are made, and combine with "advantage";
* with `reward.missing_eos_penalty`, which replaces the total reward and has no value per component.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.base import Algorithm
from rebel_diffusion.algorithms.stat_tracker import PerPromptStatTracker

AGGREGATES = ("sum", "advantage")


def check_aggregate(config: ConfigDict, algorithm: Algorithm, num_components: int) -> None:
    """Raise `ValueError` (one line naming the keys) for a `reward.aggregate` that cannot apply to this run;
    `num_components` is the number of components of `reward.name`."""
    aggregate = config.reward.aggregate
    if aggregate not in AGGREGATES:
        raise ValueError(f"reward.aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}")
    if aggregate == "sum":
        return
    if num_components < 2:
        raise ValueError(f"reward.aggregate='advantage' needs a weighted reward of at least two components, but "
                         f"reward.name={config.reward.name!r} has {num_components}")
    if not algorithm.scale_free(config):
        raise ValueError(f"reward.aggregate='advantage' would equal 'sum' for algorithm {algorithm.name!r} with these "
                         "settings: its targets are linear in the reward and even out no component's scale; use "
                         "reward.aggregate='sum', or ppo, grpo or rebel with rebel.target 'advantages' or 'batch_zscore'")
    if algorithm.kl_in_reward and config.kl_coef > 0:
        raise ValueError(f"reward.aggregate='advantage' with kl_coef > 0 is refused for algorithm {algorithm.name!r}, "
                         "which puts the KL in the reward (r - kl_coef * KL): normalised components have no common unit "
                         "to measure kl_coef in; set kl_coef=0 or reward.aggregate='sum'")
    if config.reward.missing_eos_penalty is not None:
        raise ValueError("reward.missing_eos_penalty replaces the total reward and has no per-component value under "
                         "reward.aggregate='advantage'; unset it or use reward.aggregate='sum'")


class ComponentStatTrackers:
    """One `PerPromptStatTracker` per reward component, saved and restored together as `{"components": {name:
    state}}` (a "sum" run's checkpoint holds the single tracker's state as before)."""

    def __init__(self, names: list[str], buffer_size: int, min_count: int) -> None:
        self.trackers = {name: PerPromptStatTracker(buffer_size, min_count) for name in names}

    def state_dict(self) -> dict[str, Any]:
        return {"components": {name: tracker.state_dict() for name, tracker in self.trackers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The components are those of reward.name, which defines the run: check_resumable made them the checkpoint's.
        for name, tracker in self.trackers.items():
            tracker.load_state_dict(state["components"][name])


def advantage_targets(algorithm: Algorithm, components: dict[str, np.ndarray], weights: dict[str, float],
                      prompts: list[str], trackers: ComponentStatTrackers,
                      config: ConfigDict) -> tuple[np.ndarray, dict[str, float]]:
    """`sum_i w_i T(r_i)` over the components `{name: (N, k) scores}`, and each component's share of it,
    `mean|w_i T_i| / sum_j mean|w_j T_j|` (all 0 when every weighted target is 0).

    `T` is `algorithm.targets` with the component's own tracker; the components are taken in the order of `weights`
    (the spec's), so that every tracker sees the same component at every epoch.
    """
    weighted = {name: weight * algorithm.targets(components[name], prompts, trackers.trackers[name], config)
                for name, weight in weights.items()}
    magnitudes = {name: float(np.abs(part).mean()) for name, part in weighted.items()}
    total = sum(magnitudes.values())
    shares = {name: magnitude / total if total > 0 else 0.0 for name, magnitude in magnitudes.items()}
    return sum(weighted.values()), shares
