"""Figure 3 of the REBEL paper on two CPU tasks, with every algorithm tuned at the same budget before it is compared.

    python scripts/figure3.py --task text --trials 8 --seeds 10 --jobs 2 --logdir runs/figure3 --out docs/figure3
    python scripts/figure3.py --task image --trials 4 --seeds 10 --jobs 2 --logdir runs/figure3 --out docs/figure3

For each task and algorithm (REBEL, PPO, RLOO, GRPO, online DPO and preference REBEL):

1. **Tune**: `rebel_diffusion.sweep` with the random sampler, `--trials` trials at seed 0 over the same kind of space
   (`SPACES`: the learning rate and the batch geometry, i.e. optimizer steps per epoch at the same reward queries, for
   all; eta, the clip range or beta for the algorithm that has one). A trial's objective is the task's reward on
   prompts of the training distribution (the text task: 200 of its training prompts; the image task: its 12 training
   prompts x 4 seeds) after its last epoch, so preference REBEL, whose training reward is a comparison, is scored like
   the others, and the held-out prompts are never used to choose.
2. **Final runs**: the best trial's config at `--seeds` fresh seeds (100 on: the tuning runs used seed 0), with the
   task's held-out evaluation.
3. **Report** in `OUT/<task>/`: `heldout/` and `train/` (curves.png, curves.csv, final.csv: the IQM per reward query
   with 95% stratified bootstrap intervals, `rebel_diffusion.compare`; `train/` leaves out preference REBEL, whose
   training reward is the mean comparison), `table.md` (tuned values; held-out before, after and change with 95%
   t-intervals; the KL to the base model at the end; REBEL's probability of improvement early and at the end),
   `sweeps/<algorithm>/` (the sweep's trials table and plots, best_config.py), and for the text task
   `base_temperatures.md`, the base model's held-out score at each temperature.

Everything that finished is reused: an interrupted run continues where it stopped (sweeps resume, finished final runs
are kept). `OUT/<task>/cpu_time.json` records each invocation's wall time and the CPU seconds of its child
processes, and their total.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from seeds import finished, train_run  # noqa: E402

from rebel_diffusion.compare import (compare_groups, load_group, mean_ci, plot_curves,  # noqa: E402
                                     probability_of_improvement, write_curves_csv, write_final_csv)

ALGORITHMS = ("rebel", "ppo", "rloo", "grpo", "online_dpo", "rebel_preference")
FIRST_FINAL_SEED = 100  # the sweeps' trials run at seed 0
BASE_TEMPERATURES = (0.1, 0.25, 0.4, 0.55, 0.7, 1.0, 1.3)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the comparison: its configs, its reward, and how tuning runs are scored."""

    config: str  # each algorithm's config file, {algorithm} filled in
    reward: str  # the training reward; the held-out metric is eval_<reward>
    overrides: tuple[str, ...]  # given to every run, tuning and final
    validation: tuple[str, ...]  # the tuning runs' evaluation: prompts of the training distribution, after the end
    spaces: dict[str, str]  # each algorithm's sweep space
    final: tuple[str, ...] = ()  # the final runs' changes to the config's held-out evaluation


def _spaces(learning_rate: str, batch_sizes: dict[str, str], own: dict[str, str]) -> dict[str, str]:
    """Every algorithm's space: the shared learning-rate range, its train.batch_size choices (more, as many and fewer
    optimizer steps per epoch than its config, the same three counts for every algorithm) and its own parameter."""
    return {a: f"train.learning_rate={learning_rate};train.batch_size={batch_sizes[a]};{own[a]}" for a in ALGORITHMS}


TASKS = {
    "text": Task(
        config="configs/carry_text_{algorithm}.py", reward="addition_exact", overrides=(),
        validation=("--config.eval.prompt_file={validation}", "--config.eval.every=30", "--config.eval.num_seeds=2"),
        spaces=_spaces(
            "loguniform(1e-3,3e-2)",
            {"rebel": "64,128,256", "rebel_preference": "64,128,256", "online_dpo": "64,128,256",
             "ppo": "128,256,512", "rloo": "32,64,128", "grpo": "32,64,128"},
            {"rebel": "rebel.eta=loguniform(0.3,3)", "rebel_preference": "rebel.eta=loguniform(0.3,3)",
             "ppo": "ppo.clip_range=loguniform(0.05,0.5)", "rloo": "rloo.clip_range=loguniform(0.05,0.5)",
             "grpo": "grpo.clip_range=loguniform(0.05,0.5)", "online_dpo": "dpo.beta=loguniform(0.1,10)"}),
    ),
    # Half the quickstart's 32 epochs (384 reward queries): 60 final runs of 32 epochs are 2 hours on 2 cores.
    "image": Task(
        config="configs/quickstart_{algorithm}.py", reward="large_shape",
        overrides=("--config.num_epochs=16", "--config.save_freq=16"),
        validation=("--config.eval.prompt_file=assets/quickstart_prompts.txt", "--config.eval.every=16",
                    "--config.eval.num_seeds=4", "--config.eval.rewards=large_shape"),
        # Held-out at 0, 8 and 16 epochs, 60 captions x 1 seed: the quickstart's 2 seeds would cost a third of a run.
        final=("--config.eval.every=8", "--config.eval.num_seeds=1"),
        spaces=_spaces(
            "loguniform(2e-4,2e-3)",
            {"rebel": "2,4,6", "rebel_preference": "2,4,6", "online_dpo": "2,4,6", "ppo": "4,8,12", "rloo": "1,2,3",
             "grpo": "1,2,3"},
            {"rebel": "rebel.eta=loguniform(0.3,3)", "rebel_preference": "rebel.eta=loguniform(0.3,3)",
             "ppo": "ppo.clip_range=loguniform(3e-3,3e-2)", "rloo": "rloo.clip_range=loguniform(1e-2,0.3)",
             "grpo": "grpo.clip_range=loguniform(3e-3,3e-2)", "online_dpo": "dpo.beta=loguniform(0.1,10)"}),
    ),
}
RUN_OVERRIDES = ("--config.log_with=", "--config.grid.num_prompts=0")


def _base_config(task: Task, algorithm: str):
    return runpy.run_path(str(REPO / task.config.format(algorithm=algorithm)))["get_config"]()


def _validation_prompts(task_dir: Path, base) -> Path:
    """The text task's tuning prompts: the first 200 training prompts (the held-out ones are never among them)."""
    path = task_dir / "validation_prompts.txt"
    if not path.is_file():
        lines = (REPO / base.prompt_file).read_text().splitlines()[:200]
        task_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return path


def tune(name: str, task: Task, algorithm: str, trials: int, jobs: int, task_dir: Path) -> Path:
    """Run (or resume) the algorithm's sweep; returns its folder, which holds best_config.py."""
    base = _base_config(task, algorithm)
    if any("{validation}" in v for v in task.validation):
        validation = [v.format(validation=_validation_prompts(task_dir, base)) for v in task.validation]
    else:
        validation = list(task.validation)
    out = task_dir / "sweep" / algorithm
    command = [sys.executable, "-m", "rebel_diffusion.sweep", "--config", task.config.format(algorithm=algorithm),
               "--space", task.spaces[algorithm], "--trials", str(trials), "--seeds", "1", "--jobs", str(jobs),
               "--sampler", "random", "--metric", f"eval_{task.reward}", "--last-epochs", "1", "--out", str(out),
               "--study", f"{name}_{algorithm}", *RUN_OVERRIDES, *task.overrides, *validation]
    print(f"[{name}] tuning {algorithm}: {trials} trials", flush=True)
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def final_overrides(task: Task, algorithm: str) -> list[str]:
    """The task's own held-out evaluation, undoing the tuning runs' (which best_config.py carries)."""
    e = _base_config(task, algorithm).eval
    return [*task.overrides, f"--config.eval.prompt_file={e.prompt_file}", f"--config.eval.every={e.every}",
            f"--config.eval.num_seeds={e.num_seeds}", f"--config.eval.rewards={e.rewards}", *task.final]


def final_runs(task: Task, algorithms: list[str], seeds: range, jobs: int, task_dir: Path) -> None:
    """Train each algorithm's best config at `seeds` into `task_dir/final/<algorithm>_seed<s>`. A finished run is kept
    only if it trained the current best config (`tuned_from.sha256`): more trials may have found a better one."""
    overrides = dict(o.removeprefix("--config.").split("=", 1) for o in task.overrides)
    num_epochs = int(overrides.get("num_epochs", _base_config(task, "rebel").num_epochs))

    def run(job: tuple[str, int]) -> int:
        algorithm, seed = job
        run_dir = task_dir / "final" / f"{algorithm}_seed{seed}"
        best = task_dir / "sweep" / algorithm / "best_config.py"
        digest = hashlib.sha256(best.read_bytes()).hexdigest()
        marker = run_dir / "tuned_from.sha256"
        if finished(run_dir, num_epochs) and marker.is_file() and marker.read_text() == digest:
            return 0
        code = train_run(str(best), seed, run_dir, final_overrides(task, algorithm))
        if not code:
            marker.write_text(digest)
        return code

    with ThreadPoolExecutor(jobs) as pool:
        failed = [job for job, code in zip(jobs_of(algorithms, seeds), pool.map(run, jobs_of(algorithms, seeds)))
                  if code]
    if failed:
        raise SystemExit(f"{len(failed)} final runs failed: {failed}")


def jobs_of(algorithms: list[str], seeds: range) -> list[tuple[str, int]]:
    return [(a, s) for s in seeds for a in algorithms]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ci(values: list[float] | np.ndarray, digits: int = 3, sign: bool = False) -> str:
    mean, low, high = mean_ci(np.asarray(values, dtype=float))
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(mean)} [{f.format(low)}, {f.format(high)}]"


def compare(groups: dict[str, str], metric: str, out: Path) -> object:
    """`rebel_diffusion.compare` on the groups (name -> run glob): writes curves.csv/final.csv/curves.png to `out`."""
    result = compare_groups({n: load_group(n, g, metric, "reward_queries") for n, g in groups.items()},
                            reps=50_000, seed=0, confidence=0.95)
    out.mkdir(parents=True, exist_ok=True)
    write_curves_csv(result, out / "curves.csv")
    write_final_csv(result, out / "final.csv")
    plot_curves(result, out / "curves.png", metric, "reward_queries", 50_000, 0.95)
    return result


def _at(curve, x: float) -> int:
    return int(np.argmin(np.abs(curve.x - x)))


def improvement_cells(result, x: float) -> dict[str, str]:
    """Per group at reward queries `x`: its IQM [bootstrap CI] and P(REBEL > it)."""
    curves = {c.name: c for c in result.curves}
    rebel = curves["rebel"]
    cells = {}
    for name, c in curves.items():
        i = _at(c, x)
        p = "" if name == "rebel" else (
            f"{probability_of_improvement(rebel.values[:, _at(rebel, x)], rebel.tasks, c.values[:, i], c.tasks):.2f}")
        cells[name] = (f"{c.iqm[i]:.3f} [{c.ci_low[i]:.3f}, {c.ci_high[i]:.3f}]", p)
    return cells


def tuned_values(sweep_dir: Path, space: str) -> str:
    """The best trial's values of the space's keys, read from its best_config.py."""
    text = (sweep_dir / "best_config.py").read_text()
    keys = [term.split("=")[0] for term in space.split(";")]
    values = {}
    for line in text.splitlines():
        for key in keys:
            if line.strip().startswith(f"config.{key} = "):
                value = line.split(" = ", 1)[1]
                values[key] = f"{float(value):.3g}" if "." in value or "e" in value else value
    return ", ".join(f"{k.split('.')[-1]} {values[k]}" for k in keys if k in values)


def report(name: str, task: Task, algorithms: list[str], seeds: range, task_dir: Path, out: Path) -> str:
    """Curves, the table and the sweeps' records in `out`; returns the table."""
    final = task_dir / "final"
    metric = f"eval_{task.reward}"
    held_out = compare({a: f"{final}/{a}_seed*" for a in algorithms}, metric, out / "heldout")
    scalar = [a for a in algorithms if a != "rebel_preference"]
    training = compare({a: f"{final}/{a}_seed*" for a in scalar}, "reward_mean", out / "train")
    # "Early": the first held-out evaluation after the start, and a quarter of the training budget.
    grid = held_out.curves[0].x
    early_eval, end = float(grid[1]), float(grid[-1])
    early_train = training.final_x / 4
    cells_early, cells_end = improvement_cells(held_out, early_eval), improvement_cells(held_out, end)
    train_early, train_end = improvement_cells(training, early_train), improvement_cells(training, training.final_x)
    header = ["algorithm", "tuned values", "tuning objective", "held-out before", "after [95% CI]", "change [95% CI]",
              "KL to base at the end", f"held-out IQM at {early_eval:g} queries", "P(REBEL >)",
              f"held-out IQM at {end:g}", "P(REBEL >)", f"train reward IQM at {early_train:g}", "P(REBEL >)",
              f"train reward IQM at {training.final_x:g}", "P(REBEL >)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for algorithm in algorithms:
        runs = [final / f"{algorithm}_seed{s}" for s in seeds]
        evals = [_read(r / "eval.jsonl") for r in runs]
        before, after = [e[0][metric] for e in evals], [e[-1][metric] for e in evals]
        kl = [_read(r / "metrics.jsonl")[-1]["kl"] for r in runs]
        sweep_dir = task_dir / "sweep" / algorithm
        objective = (sweep_dir / "best_config.py").read_text().split(f"IQM of {metric} ", 1)[1].split(" ")[0]
        row = [algorithm, tuned_values(sweep_dir, task.spaces[algorithm]), objective, f"{np.mean(before):.3f}",
               _ci(after), _ci(np.subtract(after, before), sign=True), _ci(kl, digits=4), *cells_early[algorithm],
               *cells_end[algorithm]]
        row += [*train_early[algorithm], *train_end[algorithm]] if algorithm in scalar else ["", "", "", ""]
        lines.append("| " + " | ".join(row) + " |")
        record = out / "sweeps" / algorithm
        shutil.copytree(sweep_dir, record, dirs_exist_ok=True, ignore=shutil.ignore_patterns("trials", "study.log*"))
        # The record's config names files relative to the repository root, where train.py runs, and its tuning
        # prompts are kept beside it.
        best_config = record / "best_config.py"
        text = best_config.read_text()
        validation = task_dir / "validation_prompts.txt"
        if validation.is_file():
            shutil.copy(validation, out / validation.name)
            text = text.replace(str(validation), str((out / validation.name).resolve()))
        best_config.write_text(text.replace(f"{REPO}/", ""))
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def base_temperatures(task: Task, out: Path) -> str:
    """The base model's held-out score at each temperature, with the trainer's own evaluation (prompts x seeds)."""
    import torch

    from rebel_diffusion.policies import make_policy
    from rebel_diffusion.rewards import make_reward_fn
    from rebel_diffusion.trainer import evaluate, read_prompts

    config = _base_config(task, "rebel")
    prompts = read_prompts(config.eval.prompt_file, "eval.prompt_file")
    seeds = [config.eval.seed + j for j in range(config.eval.num_seeds)]
    reward = {task.reward: make_reward_fn(task.reward)}
    lines = ["| temperature | base model, held-out " + task.reward + " |", "| --- | --- |"]
    for temperature in BASE_TEMPERATURES:
        config.model.temperature = temperature
        scores, _ = evaluate(make_policy(config, torch.device("cpu"), torch.float32), prompts, seeds, reward)
        lines.append(f"| {temperature} | {scores['eval_' + task.reward]:.3f} |")
    table = "\n".join(lines)
    (out / "base_temperatures.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--trials", type=int, required=True, help="sweep trials per algorithm (the same for all)")
    parser.add_argument("--seeds", type=int, default=10, help="final runs per algorithm, at fresh seeds 100 on")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (each on one thread)")
    parser.add_argument("--logdir", type=Path, default=Path("runs/figure3"))
    parser.add_argument("--out", type=Path, default=Path("docs/figure3"))
    args = parser.parse_args(argv)
    if "rebel" not in args.algorithms:
        parser.error("--algorithms must include rebel: the table compares every algorithm with it")
    task = TASKS[args.task]
    task_dir, out = args.logdir.resolve() / args.task, args.out / args.task
    start = time.time()
    for algorithm in args.algorithms:
        tune(args.task, task, algorithm, args.trials, args.jobs, task_dir)
    tuned = time.time()
    seeds = range(FIRST_FINAL_SEED, FIRST_FINAL_SEED + args.seeds)
    final_runs(task, args.algorithms, seeds, args.jobs, task_dir)
    finals = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "text":
        print(base_temperatures(task, out))
    print(report(args.task, task, args.algorithms, seeds, task_dir, out))
    # One entry per invocation: a rerun that only reports, or one that resumed, adds its own time to the record.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"cpu_seconds_children": round(usage.ru_utime + usage.ru_stime), "wall_seconds_tuning": round(tuned - start),
              "wall_seconds_final_runs": round(finals - tuned), "trials_per_algorithm": args.trials,
              "final_seeds": [seeds.start, seeds.stop - 1], "jobs": args.jobs}
    record = out / "cpu_time.json"
    invocations = json.loads(record.read_text())["invocations"] if record.is_file() else []
    invocations.append(timing)
    total = sum(i["cpu_seconds_children"] for i in invocations)
    record.write_text(json.dumps({"cpu_seconds_total": total, "invocations": invocations}, indent=1) + "\n")
    print(json.dumps(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
