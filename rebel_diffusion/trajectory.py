"""One sampled trajectory type for every policy the trainer drives.

An image chain and a token sequence are both sequences of T actions taken from states, each with a log-probability
under the policy that sampled it. The losses read only this type. For the LCM chain T is the number of stochastic
steps (7 of 8) and `states`/`actions` are latents; for a text policy T is the number of generated tokens, `actions`
are token ids and `mask` marks padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    """A batch of B trajectories of T steps.

    Attributes:
        prompts: the B prompts (contexts) the trajectories start from.
        states: `(B, T, *state_shape)` the state before each step (LCM: the latent x_t fed to the UNet).
        actions: `(B, T, *action_shape)` the action taken at each step (LCM: the next latent x_{t-1}).
        log_probs: `(B, T)` log pi(action | state) under the sampling policy, float32.
        mask: `(B, T)` bool, True where a step is real (False on padding of variable-length sequences).
        outputs: `(B, ...)` the final output (LCM: images `(B, 3, H, W)` in [0, 1]); None once dropped after scoring.
        conditioning: `(B, ...)` what the policy conditions on besides the state (LCM: prompt embeddings).
        rewards: `(B,)` the reward of each output, once scored.
    """

    prompts: list[str]
    states: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    mask: torch.Tensor
    outputs: torch.Tensor | None
    conditioning: torch.Tensor
    rewards: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        """T, the number of steps that carry a log-probability."""
        return self.log_probs.shape[1]

    def __getitem__(self, index: torch.Tensor | slice | list[int]) -> Trajectory:
        """The sub-batch at `index` (a slice, a list of ints or a 1-D index tensor)."""
        if isinstance(index, slice):
            positions = list(range(len(self)))[index]
        else:
            positions = torch.as_tensor(index).tolist()
        fields = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "prompts":
                fields["prompts"] = [value[i] for i in positions]
            elif value is not None:
                fields[field.name] = value[positions]
            else:
                fields[field.name] = None
        return Trajectory(**fields)

    @staticmethod
    def cat(trajectories: list[Trajectory]) -> Trajectory:
        """Concatenate along the batch dimension."""
        fields = {"prompts": [p for t in trajectories for p in t.prompts]}
        for field in dataclasses.fields(Trajectory):
            if field.name == "prompts":
                continue
            values = [getattr(t, field.name) for t in trajectories]
            fields[field.name] = None if any(v is None for v in values) else torch.cat(values)
        return Trajectory(**fields)

    def masked_sum(self, per_step: torch.Tensor) -> torch.Tensor:
        """Sum a `(B, T)` per-step quantity over the real steps -> `(B,)`."""
        return (per_step * self.mask).sum(dim=1)
