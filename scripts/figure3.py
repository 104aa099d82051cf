"""A CPU-scale Figure 3 of the REBEL paper: every algorithm's quickstart on the tiny LCM with the shape_fidelity reward,
over seeds, at equal reward queries, compared by IQM with stratified bootstrap intervals.

    python scripts/figure3.py --seeds 10 --jobs 2 --logdir runs/figure3 --out docs/figure3

Runs that already finished in `--logdir` are reused, so an interrupted sweep continues where it stopped. Writes
`curves.png`, `curves.csv`, `final.csv` (IQM of the training reward and probability of improvement, from
`rebel_diffusion.compare`) and `heldout.md` (held-out shape accuracy before and after training) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rebel_diffusion.compare import main as compare_main  # noqa: E402

ALGORITHMS = ("rebel", "ppo", "rloo", "grpo", "online_dpo")


def finished(run_dir: Path, num_epochs: int) -> bool:
    """A run counts when its metrics hold every epoch and its final held-out evaluation is written."""
    metrics, evals = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    if not metrics.is_file() or not evals.is_file():
        return False
    done = [json.loads(line)["epoch"] for line in evals.read_text().splitlines() if line.strip()]
    return len(metrics.read_text().splitlines()) == num_epochs and num_epochs in done


def run_one(algorithm: str, seed: int, logdir: Path, num_epochs: int) -> tuple[str, int, int]:
    """Train one quickstart run (a fresh one if an unfinished folder is in the way) and return its exit code."""
    run_dir = logdir / f"{algorithm}_seed{seed}"
    if finished(run_dir, num_epochs):
        return algorithm, seed, 0
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    command = [sys.executable, "train.py", "--config", f"configs/quickstart_{algorithm}.py", f"--config.seed={seed}",
               f"--config.logdir={logdir}", f"--config.run_name={run_dir.name}", "--config.log_with=",
               "--config.grid.num_prompts=0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        print(f"{algorithm} seed {seed} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return algorithm, seed, result.returncode


def heldout_table(logdir: Path, algorithms: list[str], seeds: int) -> str:
    """Held-out shape accuracy and fidelity before (epoch 0) and after training: mean and std over seeds."""
    lines = ["| algorithm | runs | shape accuracy before | after | shape fidelity before | after |",
             "| --- | --- | --- | --- | --- | --- |"]
    for algorithm in algorithms:
        rows = []
        for seed in range(seeds):
            path = logdir / f"{algorithm}_seed{seed}" / "eval.jsonl"
            if path.is_file():
                evals = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                rows.append([evals[0]["eval_shape_accuracy"], evals[-1]["eval_shape_accuracy"],
                             evals[0]["eval_shape_fidelity"], evals[-1]["eval_shape_fidelity"]])
        if rows:
            values = np.asarray(rows)
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(values.mean(0), values.std(0))]
            lines.append(f"| {algorithm} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (with --first-seed, a part of them)")
    parser.add_argument("--first-seed", type=int, default=0, help="run only seeds from this one on: a sweep split "
                        "across machines or processes; the comparison reads every run in --logdir")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    parser.add_argument("--logdir", type=Path, default=Path("runs/figure3"))
    parser.add_argument("--out", type=Path, default=Path("docs/figure3"))
    args = parser.parse_args(argv)
    logdir = args.logdir.resolve()
    num_epochs = _quickstart_epochs()
    jobs = [(a, s) for s in range(args.first_seed, args.seeds) for a in args.algorithms]
    with ThreadPoolExecutor(args.jobs) as pool:
        failures = [r for r in pool.map(lambda job: run_one(*job, logdir, num_epochs), jobs) if r[2]]
    if failures:
        print(f"{len(failures)} runs failed: {failures}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    groups = [f"{a}={logdir}/{a}_seed*" for a in args.algorithms]
    code = compare_main([*groups, "--metric", "reward_mean", "--x", "reward_queries", "--out", str(args.out)])
    table = heldout_table(logdir, args.algorithms, args.seeds)
    (args.out / "heldout.md").write_text(table + "\n")
    print(table)
    return code


def _quickstart_epochs() -> int:
    from configs.quickstart_rebel import get_config as quickstart

    return quickstart().num_epochs


if __name__ == "__main__":
    sys.exit(main())
