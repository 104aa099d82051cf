"""Distributed backends: DeepSpeed is refused with one line before any model loads; FSDP is the sharded path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The text quickstart cut to one tiny epoch: under the old code a run that ignores DeepSpeed ends quickly with exit 0.
TINY_TEXT = ["--config", "configs/quickstart_text_rebel.py", "--config.num_epochs=1", "--config.log_with=",
             "--config.eval.prompt_file=", "--config.grid.num_prompts=0", "--config.sample.batch_size=4",
             "--config.train.batch_size=2", "--config.run_name=run"]


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_deepspeed_is_refused_with_one_line_before_any_model_loads(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", *TINY_TEXT, f"--config.logdir={tmp_path}",
         f"--config.model.pretrained={tmp_path / 'never-loaded'}"],  # exists nowhere: only the check may speak
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_DEEPSPEED": "true"},
        capture_output=True, text=True, timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: DeepSpeed is not supported") and "FSDP" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_deepspeed_state_is_refused_by_train(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from rebel_diffusion.trainer import ConfigError, check_distributed_backend

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    check_distributed_backend()  # nothing set: no error
    monkeypatch.setitem(AcceleratorState._shared_state, "distributed_type", DistributedType.DEEPSPEED)
    with pytest.raises(ConfigError, match="DeepSpeed is not supported.*FSDP"):
        check_distributed_backend()


@pytest.mark.parametrize("policy, algorithm, message", [
    ("lcm", "rebel", "FSDP with 'rebel' on the 'lcm' policy is not supported: its pair loss scales the sharded .grad"),
    ("lcm", "online_dpo", "FSDP with 'online_dpo' on the 'lcm' policy is not supported"),
    ("causal_lm", "rebel", "FSDP needs GPUs: without one accelerate does not shard and would silently run DDP"),
])
def test_fsdp_where_it_cannot_work_is_refused(monkeypatch, policy, algorithm, message):
    # accelerate 1.16 sets DistributedType.FSDP only for GPU-family processes: on a CPU the same config runs DDP.
    from configs.base import get_config

    from rebel_diffusion.trainer import ConfigError, check_distributed_backend

    config = get_config()
    config.policy, config.algorithm = policy, algorithm
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    check_distributed_backend(config)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_distributed_backend(config)


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_fsdp_on_a_cpu_is_refused_under_the_launcher(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rebel_diffusion.launch", "--use_fsdp", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", *TINY_TEXT, f"--config.logdir={tmp_path}"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: FSDP needs GPUs" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
