"""Policies: what acts. Each samples `Trajectory` batches and re-scores their steps under its current weights.

The trainer drives any policy through the `Policy` protocol below and knows none by name; `config.policy` picks one
from `POLICIES`. Adding a policy means one file here that implements the protocol, plus its entry in `POLICIES`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import torch
from ml_collections import ConfigDict

from rebel_diffusion.trajectory import Trajectory


class Policy(Protocol):
    """A stochastic policy over T steps with a trainable adapter and a reference (the adapter disabled).

    Attributes:
        kind: "image" or "text": which rewards fit its outputs.
        model: the `torch.nn.Module` whose trainable parameters learn; the trainer may replace it by accelerate's
            prepared (wrapped) module, and the policy must call its network through this attribute.
        num_actions: T, the most steps a trajectory has.
        has_reference: whether `kl` can compare with a reference (False when all weights train, with no adapter).
        config_keys: the dotted config keys `from_config` reads, so that one set for another policy is rejected
            (`rebel_diffusion.config_keys`).
    """

    kind: str
    config_keys: frozenset[str]
    model: torch.nn.Module
    num_actions: int
    has_reference: bool

    def sample(self, prompts: list[str], generator: torch.Generator | None = None, with_kl: bool = False) -> Trajectory:
        """Sample one trajectory per prompt under `no_grad`; `with_kl` also fills `trajectory.kl` `(B, T)`."""
        ...

    def step_chunks(self) -> list[range]:
        """The steps evaluated together in one graph: `[range(0, 1), ..., range(T-1, T)]` for the LCM chain (one UNet
        graph alive at a time), `[range(0, T)]` for a token policy (all steps in one forward)."""
        ...

    def log_prob(self, trajectory: Trajectory, steps: range, with_kl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`log pi_theta(a_t|s_t)` `(B, len(steps))` under the current weights, with grad; with `with_kl` also the
        per-step KL to the reference `(B, len(steps))`, with grad through the policy side only."""
        ...

    def kl(self, trajectory: Trajectory) -> torch.Tensor:
        """Per-step KL of the current policy to the reference on the trajectory's states `(B, T)`, without grad."""
        ...

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise `ValueError` (one line) for a prompt the policy cannot take, before any compute is spent."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates."""
        ...

    def save_lora(self, directory: str | Path) -> None:
        """Write the trained weights in the format users load them with (diffusers/peft)."""
        ...

    def load_lora(self, directory: str | Path) -> None:
        """Load weights written by `save_lora`; raise `ValueError` when they do not fit."""
        ...

    def write_outputs(self, prompts: list[str], outputs_by_seed: list, path: Path) -> None:
        """Write sampled outputs (one entry per seed, each as `sample(...).outputs`) to `path` without a suffix: a PNG
        grid (rows = prompts, columns = seeds) for images, JSONL for text."""
        ...

    def diversity(self, outputs, prompts: list[str]) -> float:
        """How different the outputs of the same prompt are (`outputs` as `sample(prompts).outputs`): the mean over
        every pair of outputs with the same prompt of a distance, 0 when the policy gives one output per prompt; NaN
        when no prompt occurs twice. Images: the RMS pixel difference in [0, 1] units; text: 1 for distinct responses."""
        ...

    def save_samples(self, prompts: list[str], seeds: list[int], path: Path | None) -> None:
        """Write samples of fixed prompts and seeds (a PNG grid, or JSONL for text) to `path` without a suffix; with
        `path` None, sample the same without writing (every process makes the same calls, one writes)."""
        ...


def same_prompt_pairs(prompts: list[str]) -> tuple[list[int], list[int]]:
    """Index pairs `(i, j)`, i < j, of every two positions holding the same prompt, as two lists (for `diversity`)."""
    positions: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        positions.setdefault(prompt, []).append(index)
    pairs = [(a, b) for group in positions.values() for n, a in enumerate(group) for b in group[n + 1 :]]
    return [a for a, _ in pairs], [b for _, b in pairs]


# config.policy -> "module:class"; each class has `from_config(config, device, dtype) -> Policy`.
POLICIES = {
    "lcm": "rebel_diffusion.policies.lcm:LCMPolicy",
    "causal_lm": "rebel_diffusion.policies.causal_lm:CausalLMPolicy",
    "flow_match": "rebel_diffusion.policies.flow_match:FlowMatchPolicy",
    "ddim": "rebel_diffusion.policies.ddim:DDIMPolicy",
}


def policy_class(name: str) -> type:
    """The class registered as `name` in `POLICIES`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    module, cls = POLICIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_policy(config: ConfigDict, device: torch.device, dtype: torch.dtype) -> Policy:
    """Build the policy named by `config.policy` from the config."""
    return policy_class(config.policy).from_config(config, device=device, dtype=dtype)


__all__ = ["POLICIES", "Policy", "make_policy", "policy_class", "same_prompt_pairs"]
