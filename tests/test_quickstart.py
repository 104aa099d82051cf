"""The two quickstart runs, exactly as a new user launches them: they must finish in 5 minutes and visibly learn."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/quickstart_rebel.py", "configs/quickstart_ppo.py"])
def test_quickstart_learns_within_five_minutes(config, tmp_path):
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "--config", config,
         f"--config.logdir={tmp_path}", "--config.run_name=quickstart"],
        cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=900,
    )
    wall = time.time() - start
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "quickstart"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last3 = metrics[0], metrics[-3:]
    last_mean = sum(m["reward_mean"] for m in last3) / 3
    print(f"{config}: wall {wall:.0f} s, first epoch {first['reward_mean']:.4f} +- {first['reward_std']:.4f}, "
          f"last 3 epochs {last_mean:.4f}")
    assert wall < 300
    assert last_mean - first["reward_mean"] > first["reward_std"]
    for png in ("grid_first.png", "grid_last.png", "learning_curve.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
