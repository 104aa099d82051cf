"""Per-prompt rolling reward statistics, for advantages that compare a sample with its own prompt's history."""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


class PerPromptStatTracker:
    """Z-scores rewards against the last `buffer_size` rewards of the same prompt.

    A prompt whose buffer holds fewer than `min_count` rewards is z-scored with the whole batch's mean and std instead.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str] | np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Append this batch's rewards to their prompts' buffers, then return the advantages `(N,)`."""
        prompts = np.asarray(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            selected = prompts == prompt
            buffer = self.buffers.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            buffer.extend(rewards[selected].tolist())
            reference = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[selected] = (rewards[selected] - reference.mean()) / (reference.std() + 1e-6)
        return advantages

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (saved by `accelerate`'s `save_state`)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.buffer_size = state["buffer_size"]
        self.min_count = state["min_count"]
        self.buffers = {p: deque(b, maxlen=self.buffer_size) for p, b in state["buffers"].items()}
