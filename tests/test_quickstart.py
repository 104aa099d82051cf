"""The quickstart runs, launched as the Makefile launches them: each must finish in 5 minutes and visibly learn.

The margins hold for every seed of the 5-seed sweep in the README (docs/quickstart/gains.md), with room: the image
quickstart's smallest gains there were +0.095 (REBEL) and +0.145 (PPO) in training reward and +0.12 in held-out
large_shape; held-out shape accuracy ended between 0.05 below and 0.04 above its start, diversity at 0.78-0.91 of it.
The flow quickstart (REBEL on assets/tiny-flow, docs/quickstart_flow/gains.md) gained at least +0.104 in training
reward and +0.107 in held-out large_shape, raised held-out shape accuracy in every seed, and kept 0.79-0.87 of its
diversity.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launch(config: str, run_dir: Path) -> float:
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "rebel_diffusion.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "--config", config,
         f"--config.logdir={run_dir.parent}", f"--config.run_name={run_dir.name}"],
        cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return time.time() - start


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/quickstart_rebel.py", "configs/quickstart_ppo.py",
                                    "configs/quickstart_flow_rebel.py"])
def test_image_quickstart_draws_the_shapes_large_within_five_minutes(config, tmp_path):
    run_dir = tmp_path / "quickstart"
    wall = launch(config, run_dir)
    metrics, evals = read(run_dir / "metrics.jsonl"), read(run_dir / "eval.jsonl")
    first, last3 = metrics[0]["reward_mean"], sum(m["reward_mean"] for m in metrics[-3:]) / 3
    before, after = evals[0], evals[-1]
    print(f"{config}: wall {wall:.0f} s, large_shape first epoch {first:.3f}, last 3 epochs {last3:.3f}; held-out "
          f"large_shape {before['eval_large_shape']:.3f} -> {after['eval_large_shape']:.3f}, accuracy "
          f"{before['eval_shape_accuracy']:.3f} -> {after['eval_shape_accuracy']:.3f}, diversity "
          f"{before['eval_diversity']:.3f} -> {after['eval_diversity']:.3f}")
    assert wall < 300
    assert last3 > first + 0.05
    assert after["eval_large_shape"] > before["eval_large_shape"] + 0.06
    assert after["eval_shape_accuracy"] >= before["eval_shape_accuracy"] - 0.08  # the shapes stay right
    assert after["eval_diversity"] > 0.5 * before["eval_diversity"]  # no collapse to one image per prompt
    for png in ("grid_first.png", "grid_last.png", "learning_curve.png", "eval/epoch_0000.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/quickstart_text_rebel.py", "configs/quickstart_text_ppo.py"])
def test_text_quickstart_raises_the_success_rate_by_15_points(config, tmp_path):
    run_dir = tmp_path / "quickstart_text"
    wall = launch(config, run_dir)
    metrics, evals = read(run_dir / "metrics.jsonl"), read(run_dir / "eval.jsonl")
    first, last3 = metrics[0]["reward_mean"], sum(m["reward_mean"] for m in metrics[-3:]) / 3
    before, after = evals[0]["eval_addition_exact"], evals[-1]["eval_addition_exact"]
    print(f"{config}: wall {wall:.0f} s, success first epoch {first:.3f}, last 3 epochs {last3:.3f}; held-out "
          f"{before:.3f} -> {after:.3f}")
    assert wall < 300
    assert last3 - first >= 0.15 and after - before >= 0.15
    lines = read(run_dir / "grid_last.jsonl")
    assert lines and all({"prompt", "seed", "response"} <= set(line) for line in lines)
