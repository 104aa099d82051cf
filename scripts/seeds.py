"""Every algorithm's quickstart config, as it ships (untuned), over seeds, at equal reward queries, compared by IQM
with stratified bootstrap intervals; and the run-over-seeds helpers that the demos and the tuned Figure 3
(`scripts/figure3.py`) share.

    python scripts/seeds.py --seeds 10 --jobs 2 --logdir runs/seeds --out docs/seeds

Runs that already finished in `--logdir` are reused, so an interrupted sweep continues where it stopped. Writes
`curves.png`, `curves.csv`, `final.csv` (IQM of the training reward and probability of improvement, from
`rebel_diffusion.compare`) and `gains.md` (each algorithm's training-reward gain and the change of each held-out
metric, means over seeds with 95% t-intervals) to `--out`. `--config` runs other configs with the same tables: the
flow quickstart's 5 seeds are `--config 'configs/quickstart_flow_{algorithm}.py' --algorithms rebel --seeds 5`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rebel_diffusion.compare import main as compare_main  # noqa: E402
from rebel_diffusion.compare import mean_ci  # noqa: E402 -- the seeds are independent runs

ALGORITHMS = ("rebel", "ppo", "rloo", "grpo", "online_dpo")
CONFIG = "configs/quickstart_{algorithm}.py"


def finished(run_dir: Path, num_epochs: int) -> bool:
    """A run counts when its metrics hold every epoch and its final held-out evaluation is written."""
    metrics, evals = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    if not metrics.is_file() or not evals.is_file():
        return False
    done = [json.loads(line)["epoch"] for line in evals.read_text().splitlines() if line.strip()]
    return len(metrics.read_text().splitlines()) == num_epochs and num_epochs in done


def train_run(config: str, seed: int, run_dir: Path, extra: list[str]) -> int:
    """Train one run of `config` at `seed` into `run_dir` (a fresh one if an unfinished folder is in the way), on one
    thread and without sample grids; returns its exit code, printing the last error line when it failed."""
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    command = [sys.executable, "train.py", "--config", config, f"--config.seed={seed}",
               f"--config.logdir={run_dir.parent}", f"--config.run_name={run_dir.name}", "--config.log_with=",
               "--config.grid.num_prompts=0", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        print(f"{run_dir.name} failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    return result.returncode


def run_one(algorithm: str, seed: int, logdir: Path, num_epochs: int, config: str = CONFIG) -> tuple[str, int, int]:
    """Train one run of `config` (its `{algorithm}` filled in) unless it already finished; return its exit code."""
    run_dir = logdir / f"{algorithm}_seed{seed}"
    if finished(run_dir, num_epochs):
        return algorithm, seed, 0
    return algorithm, seed, train_run(config.format(algorithm=algorithm), seed, run_dir, [])


EVAL_METRICS = ("eval_large_shape", "eval_shape_accuracy", "eval_shape_fidelity", "eval_diversity")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gains_table(logdir: Path, algorithms: list[str], seeds: range) -> str:
    """Per algorithm, over seeds: the training reward's gain (mean of the last 3 epochs minus the first epoch) and each
    held-out metric's change (after the last epoch minus before the first), each a mean with its 95% t-interval."""
    header = ["algorithm", "seeds", "training reward: first epoch", "last 3 epochs", "gain [95% CI]", "seeds up"]
    rows = []
    for algorithm in algorithms:
        runs = [logdir / f"{algorithm}_seed{seed}" for seed in seeds]
        runs = [run for run in runs if (run / "metrics.jsonl").is_file() and (run / "eval.jsonl").is_file()]
        if not runs:
            continue
        first, last3, evals = [], [], []
        for run in runs:
            rewards = [m["reward_mean"] for m in _read(run / "metrics.jsonl")]
            first.append(rewards[0])
            last3.append(np.mean(rewards[-3:]))
            evals.append(_read(run / "eval.jsonl"))
        first, last3 = np.asarray(first), np.asarray(last3)
        gain, low, high = mean_ci(last3 - first)
        cells = [algorithm, str(len(runs)), f"{first.mean():.3f}", f"{last3.mean():.3f}",
                 f"{gain:+.3f} [{low:+.3f}, {high:+.3f}]", f"{int((last3 > first).sum())}/{len(runs)}"]
        rows.append((cells, evals))
    # The held-out metrics every run of every algorithm has, so that each column means one thing.
    names = [name for name in EVAL_METRICS if all(name in e[0] and name in e[-1] for _, evals in rows for e in evals)]
    for name in names:
        header += [f"held-out {name.removeprefix('eval_')}: before", "after", "change [95% CI]"]
    lines = []
    for cells, evals in rows:
        for name in names:
            before, after = np.asarray([e[0][name] for e in evals]), np.asarray([e[-1][name] for e in evals])
            change, low, high = mean_ci(after - before)
            cells += [f"{before.mean():.3f}", f"{after.mean():.3f}", f"{change:+.3f} [{low:+.3f}, {high:+.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header), *lines])


def held_out_table(logdir: Path, arms: list[str], seeds: range, metric: str, label: str) -> str:
    """Per arm (runs `<arm>_seed<s>` in `logdir`), over seeds: the held-out `metric` before training, after it, and
    the change, each with its 95% t-interval; `label` heads the arm column."""
    lines = [f"| {label} | seeds | held-out before | after [95% CI] | change [95% CI] |", "| --- | --- | --- | --- | --- |"]
    for arm in arms:
        evals = [_read(logdir / f"{arm}_seed{s}" / "eval.jsonl") for s in seeds]
        before, after = np.asarray([e[0][metric] for e in evals]), np.asarray([e[-1][metric] for e in evals])
        mean, low, high = mean_ci(after)
        change, c_low, c_high = mean_ci(after - before)
        lines.append(f"| {arm} | {len(evals)} | {before.mean():.3f} | {mean:.3f} [{low:.3f}, {high:.3f}] | "
                     f"{change:+.3f} [{c_low:+.3f}, {c_high:+.3f}] |")
    return "\n".join(lines)


def compare_arms(config: str, arms: dict[str, list[str]], seeds: int, jobs: int, logdir: Path, out: Path, metric: str,
                 label: str) -> int:
    """Train `config` for every arm (its extra `--config.*` arguments) at seeds 0 .. `seeds` - 1 into
    `logdir/<arm>_seed<s>` (`jobs` at a time, finished runs reused), then compare the arms' held-out `metric` per
    reward query (`rebel_diffusion.compare`: curves.png, curves.csv, final.csv) and before/after (`compare.md`,
    `held_out_table`) in `out`. Returns 1 when a run failed, else the comparison's exit code."""
    num_epochs = importlib.import_module(config.removesuffix(".py").replace("/", ".")).get_config().num_epochs

    def run(job: tuple[str, int]) -> int:
        arm, seed = job
        run_dir = logdir / f"{arm}_seed{seed}"
        return 0 if finished(run_dir, num_epochs) else train_run(config, seed, run_dir, arms[arm])

    with ThreadPoolExecutor(jobs) as pool:
        if any(pool.map(run, [(arm, seed) for seed in range(seeds) for arm in arms])):
            return 1
    out.mkdir(parents=True, exist_ok=True)
    groups = [f"{arm}={logdir}/{arm}_seed*" for arm in arms]
    code = compare_main([*groups, "--metric", metric, "--x", "reward_queries", "--out", str(out)])
    table = held_out_table(logdir, list(arms), range(seeds), metric, label)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (with --first-seed, a part of them)")
    parser.add_argument("--first-seed", type=int, default=0, help="run only seeds from this one on: a sweep split "
                        "across machines or processes; the comparison reads every run in --logdir")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    parser.add_argument("--logdir", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--out", type=Path, default=Path("docs/seeds"))
    parser.add_argument("--config", default=CONFIG, help="each algorithm's config file, {algorithm} filled in (the "
                        "flow quickstart: configs/quickstart_flow_{algorithm}.py with --algorithms rebel)")
    args = parser.parse_args(argv)
    logdir = args.logdir.resolve()
    num_epochs = _num_epochs(args.config.format(algorithm=args.algorithms[0]))
    jobs = [(a, s) for s in range(args.first_seed, args.seeds) for a in args.algorithms]
    with ThreadPoolExecutor(args.jobs) as pool:
        failures = [r for r in pool.map(lambda job: run_one(*job, logdir, num_epochs, args.config), jobs) if r[2]]
    if failures:
        print(f"{len(failures)} runs failed: {failures}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    groups = [f"{a}={logdir}/{a}_seed*" for a in args.algorithms]
    code = compare_main([*groups, "--metric", "reward_mean", "--x", "reward_queries", "--out", str(args.out)])
    table = gains_table(logdir, args.algorithms, range(args.seeds))
    (args.out / "gains.md").write_text(table + "\n")
    print(table)
    return code


def _num_epochs(config: str) -> int:
    """The epochs of a run of `config` (the same for every algorithm: the configs share one budget)."""
    return runpy.run_path(str(REPO / config))["get_config"]().num_epochs


if __name__ == "__main__":
    sys.exit(main())
