"""The learning-rate schedule as a function of the optimizer steps taken, whatever the number of processes."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler


class OptimizerStepSchedule:
    """`lr = base_lr * factor(optimizer_steps)`, `factor` one of diffusers' schedules, read from `progress` at every
    `step()` (so calling it on every micro-batch is harmless, and a resumed run continues the same curve).

    accelerate steps a prepared scheduler once per process at every optimizer step, so a schedule counted in those
    calls changes shape when a run resumes on another number of processes; this one is never prepared. `step()` also
    overwrites the learning rate a loaded optimizer state brought back, so that a changed `train.learning_rate` or
    schedule takes effect on resume.
    """

    def __init__(self, optimizer: Any, name: str, base_lr: float, warmup_steps: int, total_steps: int,
                 progress: Any) -> None:
        probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=base_lr)  # polynomial reads defaults["lr"]
        self._factor = get_scheduler(name, probe, num_warmup_steps=warmup_steps,
                                     num_training_steps=total_steps).lr_lambdas[0]
        self.optimizer, self.base_lr, self.progress = optimizer, base_lr, progress
        self.step()

    def lr_at(self, optimizer_steps: int) -> float:
        """The learning rate of the optimizer step that follows `optimizer_steps` steps."""
        return self.base_lr * self._factor(optimizer_steps)

    def step(self) -> None:
        lr = self.lr_at(self.progress.optimizer_steps)
        for group in self.optimizer.param_groups:
            group["lr"], group["initial_lr"] = lr, self.base_lr

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]
