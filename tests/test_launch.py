"""The documented launcher, `python -m rebel_diffusion.launch`: bad input is one line and exit 2, and several
processes on a CPU really run as several (plain accelerate launch starts one there without --multi_gpu)."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch(processes: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rebel_diffusion.launch", "--num_processes", str(processes), *OPTIONS,
                           *argv], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_bad_input_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    cases = {
        "checked before any process starts": (["--config.algorithm=dpo"], "unknown algorithm 'dpo'"),
        # Only the child can see this one (after the processes agree on the run folder): its code must come through.
        "found by the child": (["--config.run_name=run"], "already holds a run"),
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    for name, (args, message) in cases.items():
        result = launch(1, "train.py", "--config", "configs/quickstart_text_rebel.py", f"--config.logdir={tmp_path}",
                        "--config.log_with=", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
        assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow  # two processes launched: about a minute
def test_two_processes_on_a_cpu_are_two_processes(tmp_path):
    script = tmp_path / "world.py"
    script.write_text("import os, pathlib, sys\n"
                      "pathlib.Path(sys.argv[1], 'rank' + os.environ.get('RANK', '-')).write_text("
                      "os.environ.get('WORLD_SIZE', '-'))\n")
    result = launch(2, str(script), str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name: p.read_text() for p in tmp_path.glob("rank*")} == {"rank0": "2", "rank1": "2"}
    lines = [line for line in result.stderr.splitlines() if "rebel_diffusion.launch" in line]
    assert len(lines) == 1 and "2 processes on the CPU" in lines[0], result.stderr[-2000:]


@pytest.mark.slow  # two processes launched: about a minute
def test_plain_accelerate_launch_running_one_of_two_processes_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", *OPTIONS, "train.py", "--config",
         "configs/base.py", "--config.algorithm=dpo"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.stderr.startswith("warning: accelerate launch was asked for several processes but started only "
                                    "this one"), result.stderr[-2000:]
