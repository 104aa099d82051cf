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
        outputs: the final outputs (LCM: images `(B, 3, H, W)` in [0, 1]; text: a list of B strings); None once dropped
            after scoring.
        conditioning: `(B, ...)` what the policy conditions on besides the state (LCM: prompt embeddings; text: the
            prompt's attention mask).
        rewards: `(B,)` the reward of each output, once scored.
        kl: `(B, T)` per-step KL of the sampling policy to the reference, when sampled `with_kl`.
        truncated: `(B,)` bool, True where the length limit cut the output (a response without EOS); None for images.
    """

    prompts: list[str]
    states: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    mask: torch.Tensor
    outputs: torch.Tensor | list[str] | None
    conditioning: torch.Tensor
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    truncated: torch.Tensor | None = None

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
            if isinstance(value, list):
                fields[field.name] = [value[i] for i in positions]
            elif value is not None:
                fields[field.name] = value[positions]
            else:
                fields[field.name] = None
        return Trajectory(**fields)

    @staticmethod
    def cat(trajectories: list[Trajectory]) -> Trajectory:
        """Concatenate along the batch dimension.

        Variable-length fields (a text policy's prompt and response tokens) are right-padded with zeros to the longest:
        padded steps get `mask` False and padded prompt positions an attention mask of 0, so nothing reads them.
        """
        fields = {}
        for field in dataclasses.fields(Trajectory):
            values = [getattr(t, field.name) for t in trajectories]
            if any(v is None for v in values):
                fields[field.name] = None
            elif isinstance(values[0], list):
                fields[field.name] = [item for v in values for item in v]
            else:
                fields[field.name] = torch.cat(_pad_to_longest(values))
        return Trajectory(**fields)

    def masked_sum(self, per_step: torch.Tensor) -> torch.Tensor:
        """Sum a `(B, T)` per-step quantity over the real steps -> `(B,)`."""
        return (per_step * self.mask).sum(dim=1)


def _pad_to_longest(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Right-pad `(B_i, L_i, ...)` tensors along dim 1 with zeros to the largest L_i (no copy when all agree)."""
    if values[0].dim() < 2 or len({v.shape[1] for v in values}) == 1:
        return values
    length = max(v.shape[1] for v in values)
    return [torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, length - v.shape[1])) for v in values]
