"""Policies: what acts. Each samples `Trajectory` batches and re-scores their steps under its current weights.

The trainer drives any policy through the `Policy` protocol below and knows none by name; `config.policy` picks one
from `POLICIES`. Adding a policy means one file here that implements the protocol, plus its entry in `POLICIES`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def adapter_disabled(policy: Policy) -> Iterator[None]:
    """Inside the block the policy is its base model, the reference: its own network with the LoRA adapter switched
    off (no second copy of the weights). `ValueError` when there is no adapter (lora.rank=0: every weight trains)."""
    if not policy.has_reference:
        raise ValueError("the base model needs a LoRA adapter to switch off; with lora.rank=0 every weight trains")
    pipeline = getattr(policy, "pipeline", None)
    if pipeline is not None:  # a diffusers pipeline: its UNet or transformer carries the adapter
        denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
        denoiser.disable_adapters()
        try:
            yield
        finally:
            denoiser.enable_adapters()
        return
    with policy.network.disable_adapter():  # a peft model
        yield


@torch.no_grad()
def rescore(policy: Policy, trajectory: Trajectory, with_kl: bool = False,
            reference_log_probs: torch.Tensor | None = None) -> Trajectory:
    """A trajectory that another distribution drew (the base model, offline data), as if the current policy had:
    `log_probs` `(B, T)` become the current weights' (pi_t at sampling time), and with `with_kl` `kl` the k1
    log-ratio `log pi_t - log pi_ref` at the taken actions, the reward-shaping term a sampled trajectory carries.

    `reference_log_probs` `(B, T)` are the reference's log-probs when known (a trajectory the base model sampled
    records its own); otherwise they cost one more pass with the adapter disabled. Changes `trajectory` in place.
    """
    def log_probs() -> torch.Tensor:
        chunks = [policy.log_prob(trajectory, steps)[0] for steps in policy.step_chunks()]
        return torch.cat(chunks, dim=1).float() * trajectory.mask

    current = log_probs()
    if with_kl:
        if reference_log_probs is None:
            with adapter_disabled(policy):
                reference_log_probs = log_probs()
        trajectory.kl = (current - reference_log_probs) * trajectory.mask
    trajectory.log_probs = current
    return trajectory


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


__all__ = ["POLICIES", "Policy", "adapter_disabled", "make_policy", "policy_class", "rescore", "same_prompt_pairs"]
