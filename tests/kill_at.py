"""Run `train.py` and SIGKILL it at a chosen moment: `python tests/kill_at.py <phase> <n> --config ... [--config.x=...]`.

The process kills itself at the n-th event of the phase:
- `sampling`: a forward pass of the policy's network without gradient (sampling, held-out evaluation, the KL estimate);
- `training`: a forward pass with gradient;
- `checkpoint`: a checkpoint whose weights, optimizer and RNG states are written but which is not complete yet.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rebel_diffusion.checkpoints as checkpoints  # noqa: E402
import rebel_diffusion.trainer as trainer  # noqa: E402
import train  # noqa: E402

PHASES = ("sampling", "training", "checkpoint")


def main(argv: list[str]) -> int:
    phase, n = argv[1], int(argv[2])
    if phase not in PHASES or n < 1:
        print(f"usage: kill_at.py {{{','.join(PHASES)}}} N >= 1 --config ...", file=sys.stderr)
        return 2
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if count == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if phase == "checkpoint":
        write_model_card = checkpoints.write_model_card

        def write_then_die(*args, **kwargs):
            tick()
            return write_model_card(*args, **kwargs)

        checkpoints.write_model_card = write_then_die
    else:
        make_policy = trainer.make_policy
        with_grad = phase == "training"

        def make_and_watch(*args, **kwargs):
            policy = make_policy(*args, **kwargs)
            # The first linear layer runs in every forward pass of the network, however it is wrapped.
            layer = next(m for m in policy.model.modules() if isinstance(m, torch.nn.Linear))
            layer.register_forward_hook(lambda *_: tick() if torch.is_grad_enabled() == with_grad else None)
            return policy

        trainer.make_policy = make_and_watch
    return train.main(["train.py", *argv[3:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
