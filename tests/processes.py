"""Training as separate processes: two ranks under accelerate launch, ranks started by hand (no launcher to stop the
others when one fails), scripts that run the trainer with a patch applied."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def write_script(path: Path, body: str) -> Path:
    """A Python script that imports the repository and the test helpers, then runs `body` (dedented)."""
    path.write_text(f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(TESTS)!r}]\n" + textwrap.dedent(body))
    return path


def write_weights_dump_script(path: Path, train_call: str) -> Path:
    """A script that runs `train_call` (trainer.train(...)) with every process saving its trainable weights at each
    checkpoint as `rank<i>.pt` in the run folder."""
    return write_script(path, f"""
        import torch
        import rebel_diffusion.trainer as trainer
        from test_trainer import text_config, tiny_config

        original = trainer.save_checkpoint
        def save_and_dump(accelerator, run_dir, progress, keep, *card):
            model = accelerator.unwrap_model(accelerator._models[0])
            weights = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
            torch.save(weights, run_dir / f"rank{{accelerator.process_index}}.pt")
            return original(accelerator, run_dir, progress, keep, *card)
        trainer.save_checkpoint = save_and_dump
        {train_call}
    """)


def launch_two_processes(script: Path) -> None:
    """Run `script` as two CPU processes (gloo) with accelerate launch; fail with its stderr if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@dataclasses.dataclass
class Ended:
    returncode: int
    stderr: str
    seconds: float  # from the start of all ranks to this one's exit


def start_ranks(argvs: list[list[str]], timeout: float, env: dict[str, str] | None = None) -> list[Ended]:
    """Run one process per argv as the ranks of one CPU (gloo) job, with the environment a launcher sets but no
    launcher, so nothing but the processes themselves stops a rank when another fails. Every rank must end within
    `timeout` seconds of the start, else the test fails (the ranks are killed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = str(len(argvs))
    with tempfile.TemporaryDirectory() as logs:
        stderr_paths = [Path(logs) / f"rank{rank}.err" for rank in range(len(argvs))]
        start = time.monotonic()
        processes = []
        for rank, (argv, path) in enumerate(zip(argvs, stderr_paths)):
            with path.open("w") as stderr:  # a file, not a pipe: a rank that writes a lot must not block on it
                processes.append(subprocess.Popen(
                    [sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                    env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "RANK": str(rank),
                         "LOCAL_RANK": str(rank), "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world,
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                ))
        ended_at: dict[int, float] = {}
        try:
            while len(ended_at) < len(processes):
                if time.monotonic() - start > timeout:
                    raise AssertionError(f"a rank was still running {timeout:.0f} s after the start")
                for rank, process in enumerate(processes):
                    if rank not in ended_at and process.poll() is not None:
                        ended_at[rank] = time.monotonic() - start
                time.sleep(0.05)
        finally:
            for process in processes:
                process.kill()
                process.wait()
        return [Ended(process.returncode, path.read_text(), ended_at[rank])
                for rank, (process, path) in enumerate(zip(processes, stderr_paths))]
