"""The learning-rate schedule (rebel_diffusion.schedule) is a function of the optimizer steps taken: the same curve on
one process or two, and after a resume."""

import json
from pathlib import Path

import pytest
import torch

from rebel_diffusion.checkpoints import TrainingProgress
from rebel_diffusion.schedule import OptimizerStepSchedule
from rebel_diffusion.trainer import train

from processes import launch_two_processes, write_script
from test_trainer import read_metrics, text_config

BASE_LR, WARMUP, TOTAL = 1e-2, 3, 6  # text_config: 2 optimizer steps per epoch, so 3 epochs make 6 steps


def linear(step: int, base: float = BASE_LR, warmup: int = WARMUP, total: int = TOTAL) -> float:
    """The textbook linear schedule: the lr of the optimizer step taken after `step` steps."""
    if step < warmup:
        return base * step / warmup
    return base * max(0.0, (total - step) / (total - warmup))


def test_the_lr_at_each_optimizer_step_is_the_formula_also_after_a_resume():
    progress = TrainingProgress()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR)
    schedule = OptimizerStepSchedule(optimizer, "linear", BASE_LR, WARMUP, TOTAL, progress)
    seen = []
    for step in range(TOTAL + 2):
        progress.optimizer_steps = step
        schedule.step()
        schedule.step()  # called on every micro-batch: changes nothing until the next optimizer step
        seen.append(schedule.get_last_lr()[0])
    assert seen == pytest.approx([linear(s) for s in range(TOTAL + 2)], abs=1e-12)
    # A resumed run: the loaded optimizer state brings back another lr; the schedule at step 4 overwrites it.
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["initial_lr"] = 0.5
    progress.optimizer_steps = 4
    OptimizerStepSchedule(optimizer, "linear", 2e-3, WARMUP, 10, progress)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(linear(4, base=2e-3, total=10))
    assert optimizer.param_groups[0]["initial_lr"] == 2e-3


def _linear_config(logdir: Path, **overrides):
    return text_config(logdir, **{"num_epochs": 3, "train.lr_schedule": "linear", "train.lr_warmup_steps": WARMUP,
                                   **overrides})


def test_a_run_takes_each_optimizer_step_at_the_formula_s_lr(tmp_path, monkeypatch):
    used, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run_dir = train(_linear_config(tmp_path))
    assert used == pytest.approx([linear(s) for s in range(TOTAL)], abs=1e-12)
    metrics = read_metrics(run_dir)
    assert [m["optimizer_steps"] for m in metrics] == [2, 4, 6]
    assert [m["lr"] for m in metrics] == pytest.approx([linear(2), linear(4), linear(6)], abs=1e-12)


@pytest.mark.slow  # two processes launched: about a minute
def test_a_one_process_checkpoint_resumed_on_two_processes_continues_the_curve(tmp_path):
    """Old behaviour: the schedule counted num_processes scheduler calls per optimizer step, so two processes raced
    through the rest of the curve (lr after epoch 1 at the warmup's end instead of 2/3 of it)."""
    one = train(_linear_config(tmp_path, save_freq=1))
    checkpoint = one / "checkpoints" / "epoch_0001"
    script = write_script(tmp_path / "resume_on_two.py", f"""
        from rebel_diffusion.trainer import train
        from test_schedule import _linear_config
        train(_linear_config({str(tmp_path)!r}, run_name="two", resume_from={str(checkpoint)!r}))
    """)
    launch_two_processes(script)
    two = read_metrics(tmp_path / "two")
    assert [m["epoch"] for m in two] == [1, 2]
    assert [m["optimizer_steps"] for m in two] == [4, 6]  # steps per epoch are per process: unchanged
    assert [m["lr"] for m in two] == pytest.approx([linear(4), linear(6)], abs=1e-12)
    assert [m["lr"] for m in two] == pytest.approx([m["lr"] for m in read_metrics(one)[1:]], abs=1e-12)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["resume_from"] == str(checkpoint)
