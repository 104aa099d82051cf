"""Hyperparameter sweeps on Optuna: trials train ordinary run folders; processes and machines share one study.

    python -m rebel_diffusion.sweep --config configs/quickstart_rebel.py \\
        --space "train.learning_rate=loguniform(1e-4,1e-2);rebel.eta=0.3,1,3" --trials 20 --seeds 3 --jobs 2 \\
        --out runs/sweep [--storage URL] [--study NAME] [--sampler tpe|random|grid] [--config.key=value ...]

Each trial trains its sampled values (plus every `--config.key=value` given here) at `--seeds` seeds, one run folder
each, `OUT/trials/<run>-seed<s>`, with `train.py`; its objective is the IQM of `--metric` over the seeds' last
`--last-epochs` epochs (or evaluations, for an `eval_*` metric). `--jobs J` runs J worker processes; each takes the
next trial from the study until `--trials` trials are finished (complete, pruned, or failed in training). A sweep that
is killed resumes when it is started again: finished run folders are reused, an interrupted one resumes from its last
checkpoint, and the trial a dead worker left RUNNING is failed and queued again with the same values and run folders.
A worker is dead when its process is gone (same host) or its heartbeat is `STALE_BEATS` intervals old (any host).

Writes `OUT/trials.csv`, `OUT/trials.md`, `OUT/objective_vs_<key>.png` and `OUT/best_config.py`, a config file for
`train.py --config` (the base config, the pass-through overrides, then the best trial's values).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import math
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
RANGES = ("loguniform", "uniform", "int")
SAMPLERS = ("tpe", "random", "grid")
# Set by the sweep for every run, so a space may not sample them.
RESERVED_KEYS = ("seed", "logdir", "run_name", "resume_from")
STALE_BEATS = 3  # heartbeats a trial may miss before another worker takes it for dead
POLL_S = 2.0  # how often a worker with nothing to start looks again (others' trials may finish or go stale)


class SweepError(ValueError):
    """A problem with the sweep's input, reported as one line and exit 2 before any trial runs."""


class Interrupted(Exception):
    """A trial's run was stopped from outside (SIGTERM, SIGINT, SIGHUP): the sweep is being stopped, not the trial
    failing. Its worker queues the trial again and stops."""


# Signals that stop a run from outside. SIGKILL is not among them: the kernel's out-of-memory killer sends it, and a
# trial that does not fit would be retried forever.
INTERRUPTS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
INTERRUPTED_EXIT = 130


# ---- The search space ----

@dataclasses.dataclass(frozen=True)
class Param:
    """One term of `--space`: a config key and the distribution its values are drawn from."""

    key: str
    kind: str  # one of RANGES, or "categorical"
    low: float = 0.0
    high: float = 0.0
    choices: tuple[str, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """This parameter's value for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")


def _range(term: str, kind: str, arguments: str) -> tuple[float, float]:
    parts = [part.strip() for part in arguments.split(",")]
    if len(parts) != 2:
        raise SweepError(f"--space term {term!r}: {kind}(low,high) takes two numbers")
    try:
        low, high = (int(p) for p in parts) if kind == "int" else (float(p) for p in parts)
    except ValueError:
        what = "integers" if kind == "int" else "numbers"
        raise SweepError(f"--space term {term!r}: {kind}(low,high) takes two {what}, got {arguments!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SweepError(f"--space term {term!r}: low must be below high, both finite")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"--space term {term!r}: loguniform needs low > 0")
    return low, high


def parse_space(text: str) -> list[Param]:
    """`key=loguniform(a,b);key=uniform(a,b);key=int(a,b);key=v1,v2,...` as Params; a `SweepError` naming the bad term."""
    params: list[Param] = []
    for term in (t.strip() for t in text.split(";")):
        if not term:
            continue
        key, sep, values = (part.strip() for part in term.partition("="))
        if not sep or not values:
            raise SweepError(f"--space term {term!r} is not KEY=VALUES (e.g. rebel.eta=0.3,1,3)")
        if not KEY.fullmatch(key):
            raise SweepError(f"--space term {term!r}: {key!r} is not a config key")
        if key in RESERVED_KEYS:
            raise SweepError(f"--space term {term!r}: the sweep sets {key} for every run (seeds: --seeds)")
        if any(p.key == key for p in params):
            raise SweepError(f"--space term {term!r}: {key} appears twice")
        call = re.fullmatch(r"(\w+)\((.*)\)", values)
        if call and call.group(1) in RANGES:
            params.append(Param(key, call.group(1), *_range(term, call.group(1), call.group(2))))
            continue
        if call or "(" in values:
            raise SweepError(f"--space term {term!r}: unknown distribution; use loguniform(a,b), uniform(a,b), "
                             "int(a,b) or a comma list")
        choices = tuple(v.strip() for v in values.split(","))
        if "" in choices:
            raise SweepError(f"--space term {term!r}: an empty value in the comma list")
        if len(choices) < 2:
            raise SweepError(f"--space term {term!r}: a comma list needs two values or more (one value is "
                             f"--config.{key}={values})")
        if len(set(choices)) < len(choices):
            raise SweepError(f"--space term {term!r}: a value appears twice")
        params.append(Param(key, "categorical", choices=choices))
    if not params:
        raise SweepError("--space is empty; give KEY=VALUES terms separated by ';'")
    return params


def typed(default: Any, text: str) -> Any:
    """`text` as a value of `default`'s type, the way `--config.key=text` sets it; `ValueError` if it is not one."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if isinstance(default, (int, float)):
        return type(default)(text)
    return text


def check_space(space: list[Param], config: Any) -> None:
    """Every key of the space names a value of the config, of a type its distribution can produce."""
    from rebel_diffusion.config_keys import flatten

    flat = flatten(config.to_dict())
    for param in space:
        if param.key not in flat:
            close = difflib.get_close_matches(param.key, list(flat), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise SweepError(f"--space: unknown config key {param.key!r}{hint}")
        default = flat[param.key]
        if default is None:  # a placeholder: train.py checks the values
            continue
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if param.kind in ("loguniform", "uniform") and not (numeric and isinstance(default, float)):
            raise SweepError(f"--space: {param.key} is {type(default).__name__} ({default!r}), but {param.kind} draws "
                             "floats; use int(a,b) or a comma list")
        if param.kind == "int" and not numeric:
            raise SweepError(f"--space: {param.key} is {type(default).__name__} ({default!r}), but int(a,b) draws "
                             "integers; use a comma list")
        for choice in param.choices:
            try:
                typed(default, choice)
            except ValueError:
                raise SweepError(f"--space: {choice!r} is not a {type(default).__name__}, the type of "
                                 f"{param.key}") from None


# ---- The objective ----

def last_values(run_dir: Path, metric: str, last: int) -> np.ndarray:
    """`metric` over a run's last `last` epochs (metrics.jsonl), or last evaluations for `eval_*` (eval.jsonl)."""
    from rebel_diffusion.compare import read_metrics

    return read_metrics(run_dir, metric, "epoch")[1][-last:]


def objective(per_seed: list[np.ndarray]) -> float:
    """The IQM over seeds x last epochs: every value counts once, the top and bottom quarter are dropped."""
    from rebel_diffusion.compare import iqm

    return float(iqm(np.concatenate(per_seed)))


# ---- One sweep, as its workers see it ----

@dataclasses.dataclass(frozen=True)
class Sweep:
    """The checked command line, as each worker process gets it."""

    config: str
    overrides: tuple[str, ...]
    space: tuple[Param, ...]
    trials: int
    seeds: int
    jobs: int
    storage: str
    study: str
    out: Path
    sampler: str
    metric: str
    last_epochs: int
    direction: str
    prune: bool
    heartbeat_s: float

    def definition(self) -> dict[str, Any]:
        """What makes two sweeps the same study: a sweep resumed, or joined from another machine, must match it."""
        return {"config": self.config, "overrides": list(self.overrides),
                "space": [dataclasses.asdict(p) | {"choices": list(p.choices)} for p in self.space],
                "seeds": self.seeds, "metric": self.metric, "last_epochs": self.last_epochs}


def open_storage(url: str) -> Any:
    """An RDB URL (`sqlite:///...`, `postgresql://...`) as Optuna takes it; anything else is a journal file path."""
    if "://" in url:
        return url
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def make_sampler(sweep: Sweep) -> Any:
    import optuna

    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: list(p.choices) for p in sweep.space})
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler()
    # Workers run trials side by side: the constant liar keeps TPE from proposing what a running trial already tries.
    return optuna.samplers.TPESampler(constant_liar=True)


def load_study(sweep: Sweep) -> Any:
    import optuna

    pruner = optuna.pruners.MedianPruner() if sweep.prune else optuna.pruners.NopPruner()
    return optuna.load_study(study_name=sweep.study, storage=open_storage(sweep.storage), sampler=make_sampler(sweep),
                             pruner=pruner)


def counts(trial: Any) -> bool:
    """Whether a trial takes a place of the `--trials` budget: all but those failed as stale or surplus."""
    from optuna.trial import TrialState

    return trial.state != TrialState.FAIL or "error" in trial.user_attrs


def finished(trial: Any) -> bool:
    return counts(trial) and trial.state.is_finished()


def tell(study: Any, trial: Any, **outcome: Any) -> None:
    """`study.tell`, for a trial that another worker may have failed as stale meanwhile."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        study.tell(trial, **outcome)
    except UpdateFinishedTrialError:
        print(f"sweep: trial {getattr(trial, 'number', trial)} was taken for dead by another worker and queued again",
              file=sys.stderr)
    except RuntimeError as e:
        # GridSampler.after_trial calls study.stop() once the grid is done, which works only inside study.optimize;
        # optuna stores the trial's state before that (in a `finally`), so the tell itself happened.
        if "Study.stop" not in str(e):
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fail_stale(study: Any, heartbeat_s: float) -> None:
    """Fail the RUNNING trials of dead workers and queue each again with its values and run folders, so that the
    retry reuses the runs it finished and resumes the one it was training."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        beat = attrs.get("heartbeat", trial.datetime_start.timestamp())
        dead_here = attrs.get("host") == host and "pid" in attrs and not _alive(attrs["pid"])
        if not dead_here and time.time() - beat < STALE_BEATS * attrs.get("heartbeat_s", heartbeat_s):
            continue
        if requeue(study, trial):
            print(f"sweep: trial {trial.number} was left running by a dead worker; queued again", file=sys.stderr)


def requeue(study: Any, trial: Any) -> bool:
    """Fail `trial` without an error line (so it takes no place of the budget) and queue it again with its values and
    run folders; False when it was finished meanwhile (by its worker, or by another worker that queues the retry)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        # The state directly, not study.tell: the sampler's after_trial is for the worker that ran the trial.
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False
    study.enqueue_trial(trial.params, user_attrs={"run": trial.user_attrs.get("run", f"{trial.number:03d}")})
    return True


class Heartbeat:
    """Who runs a trial (host, pid) and a time stamp every `interval` seconds, in the trial's user attrs: what lets
    another worker, or this sweep started again, tell a dead worker's trial from a running one."""

    def __init__(self, trial: Any, interval: float) -> None:
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        for key, value in {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat_s": self.interval,
                           "heartbeat": time.time()}.items():
            self.trial.set_user_attr(key, value)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self.trial.set_user_attr("heartbeat", time.time())


def run_finished(run_dir: Path) -> bool:
    """Whether a run folder's last complete checkpoint has all the epochs of its config (train.py would do nothing)."""
    import json

    from rebel_diffusion.checkpoints import complete_checkpoints, finished_epochs

    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints or not (run_dir / "config.json").is_file():
        return False
    return finished_epochs(checkpoints[-1]) == json.loads((run_dir / "config.json").read_text())["num_epochs"]


def train_run(sweep: Sweep, values: dict[str, Any], run_dir: Path, seed: int) -> str | None:
    """Train (or resume, or reuse) one run folder; None when it is finished, else the line it failed with."""
    from rebel_diffusion.checkpoints import _is_run_folder

    if run_finished(run_dir):
        return None
    command = [sys.executable, str(TRAIN), "--config", sweep.config, *sweep.overrides,
               *[f"--config.{key}={value!r}" if isinstance(value, float) else f"--config.{key}={value}"
                 for key, value in values.items()],
               f"--config.seed={seed}", f"--config.logdir={run_dir.parent}", f"--config.run_name={run_dir.name}"]
    if _is_run_folder(run_dir):  # started before: the trainer resumes its checkpoint, or starts over in the folder
        command.append(f"--config.resume_from={run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # J runs side by side, each with every core's thread, would thrash: give each its share unless told otherwise.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // sweep.jobs)), **os.environ}
    with (run_dir / "sweep.log").open("a") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code == 0:
        return None
    if -code in INTERRUPTS:
        raise Interrupted(f"{run_dir.name} was stopped by signal {-code}")
    lines = [line for line in (run_dir / "sweep.log").read_text().splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1] if lines else "")
    return f"exit {code}: {said[:300]}"


def run_trial(study: Any, sweep: Sweep, trial: Any) -> None:
    """Train a trial's seeds and tell the study its objective (or that it was pruned or failed)."""
    from optuna.trial import TrialState

    from rebel_diffusion.compare import CompareError

    values = {param.key: param.suggest(trial) for param in sweep.space}
    run = trial.user_attrs.get("run", f"{trial.number:03d}")  # a retried trial keeps its first run folders
    trial.set_user_attr("run", run)
    start, outcome, per_seed = time.time(), {}, []
    with Heartbeat(trial, sweep.heartbeat_s):
        for seed in range(sweep.seeds):
            run_dir = sweep.out / "trials" / f"{run}-seed{seed}"
            try:
                error = train_run(sweep, values, run_dir, seed)
            except Interrupted as e:
                requeue(study, trial)
                print(f"sweep: trial {trial.number}: {e}; queued again, this worker stops", file=sys.stderr)
                raise
            if error is None:
                try:
                    per_seed.append(last_values(run_dir, sweep.metric, sweep.last_epochs))
                except CompareError as e:
                    error = f"--metric {sweep.metric}: {e}"
            if error is not None:
                trial.set_user_attr("error", f"seed {seed}: {error}")
                print(f"trial {trial.number} seed {seed} failed: {error}", file=sys.stderr)
                outcome = {"state": TrialState.FAIL}
                break
            if sweep.prune and seed < sweep.seeds - 1:  # the pruner compares trials seed by seed
                trial.report(objective(per_seed), seed)
                if trial.should_prune():
                    outcome = {"state": TrialState.PRUNED}
                    break
        else:
            outcome = {"values": objective(per_seed)}
    tell(study, trial, **outcome)
    shown = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in values.items())
    result = f"{sweep.metric} IQM {outcome['values']:.4g}" if "values" in outcome else outcome["state"].name.lower()
    print(f"trial {trial.number} (runs {run}-seed*): {result}  {shown}  {time.time() - start:.0f} s", flush=True)


def surplus(study: Any, trial: Any, budget: int) -> bool:
    """Whether a trial just asked for is beyond the budget: workers count the trials and ask at the same time, and the
    trial numbers settle who was first."""
    return sum(counts(t) and t.number < trial.number for t in study.get_trials(deepcopy=False)) >= budget


def work(sweep: Sweep) -> None:
    """One worker: start the study's next trial until `sweep.trials` trials are finished."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(sweep)
    while True:
        fail_stale(study, sweep.heartbeat_s)
        trials = [t for t in study.get_trials(deepcopy=False) if counts(t)]
        if sum(t.state.is_finished() for t in trials) >= sweep.trials:
            return
        if len(trials) >= sweep.trials and not any(t.state == TrialState.WAITING for t in trials):
            time.sleep(POLL_S)  # every place is taken by a running trial: wait for it to finish or go stale
            continue
        trial = study.ask()
        if surplus(study, trial, sweep.trials):
            tell(study, trial, state=TrialState.FAIL)  # it trained nothing, and does not count
            continue
        try:
            run_trial(study, sweep, trial)
        except Interrupted:
            sys.exit(INTERRUPTED_EXIT)  # the trial is queued again: the same command resumes it


# ---- Output ----

def report(sweep: Sweep, config: Any) -> int:
    """Write the table, the plots and the best config; 0 when some trial completed, else 1."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = sorted((t for t in load_study(sweep).get_trials(deepcopy=False) if finished(t)), key=lambda t: t.number)
    keys = [p.key for p in sweep.space]
    header = ["trial", "runs", "state", f"{sweep.metric} IQM", *keys, "error"]
    rows = [[t.number, f"{t.user_attrs.get('run', '')}-seed*", t.state.name,
             "" if t.value is None else t.value, *[t.params.get(k, "") for k in keys],
             t.user_attrs.get("error", "")] for t in trials]
    with (sweep.out / "trials.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    def cell(value: Any) -> str:  # the CSV keeps every digit; the table is for reading
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")

    table = "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                       *["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]])
    (sweep.out / "trials.md").write_text(table + "\n")
    print(table)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        print(f"sweep: no trial completed; see {sweep.out / 'trials.md'}", file=sys.stderr)
        return 1
    best = (max if sweep.direction == "maximize" else min)(complete, key=lambda t: t.value)
    for param in sweep.space:
        plot_objective(sweep, param, complete, best)
    write_best_config(sweep, config, best)
    print(f"best: trial {best.number}, {sweep.metric} IQM {best.value:.6g}; config {sweep.out / 'best_config.py'}")
    return 0


def plot_objective(sweep: Sweep, param: Param, complete: list[Any], best: Any) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    def x_of(trial: Any) -> float:
        value = trial.params[param.key]
        return param.choices.index(value) if param.kind == "categorical" else value

    ax.scatter([x_of(t) for t in complete], [t.value for t in complete], alpha=0.7, label="trials")
    ax.scatter([x_of(best)], [best.value], marker="*", s=160, color="C3", label=f"best (trial {best.number})")
    if param.kind == "categorical":
        ax.set_xticks(range(len(param.choices)), param.choices)
    elif param.kind == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel(param.key)
    ax.set_ylabel(f"IQM of {sweep.metric}")
    ax.set_title(f"{sweep.study}: {len(complete)} trials x {sweep.seeds} seeds")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(sweep.out / f"objective_vs_{param.key}.png", dpi=100)


def write_best_config(sweep: Sweep, config: Any, best: Any) -> None:
    """A config file for `train.py --config`: the base config file, the pass-through overrides, the best values."""
    from rebel_diffusion.config_keys import flatten

    flat = flatten(config.to_dict())  # the base with the pass-through overrides applied, typed by absl
    assignments = {override.removeprefix("--config.").split("=")[0]: None for override in sweep.overrides}
    assignments = {key: flat[key] for key in assignments}
    for param in sweep.space:
        value = best.params[param.key]
        assignments[param.key] = typed(flat[param.key], value) if isinstance(value, str) else value
    lines = [f'"""The best trial of sweep {sweep.study!r}: trial {best.number}, IQM of {sweep.metric} '
             f'{best.value:.6g} over {sweep.seeds} seeds x the last {sweep.last_epochs} epochs."""',
             "", "import importlib.util", "", "", "def get_config():",
             f"    spec = importlib.util.spec_from_file_location('sweep_base_config', "
             f"{str(Path(sweep.config).resolve())!r})",
             "    module = importlib.util.module_from_spec(spec)",
             "    spec.loader.exec_module(module)",
             "    config = module.get_config()",
             *[f"    config.{key} = {value!r}" for key, value in assignments.items()],
             "    return config", ""]
    (sweep.out / "best_config.py").write_text("\n".join(lines))


# ---- The command ----

class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2 as for every other input error, not a usage block
        raise _ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m rebel_diffusion.sweep", description=__doc__.splitlines()[0],
                                     epilog="Any --config.KEY=VALUE passes through to every trial.")
    parser.add_argument("--config", required=True, help="the training config file, as for train.py")
    parser.add_argument("--space", required=True,
                        help="KEY=loguniform(a,b) | uniform(a,b) | int(a,b) | v1,v2,... terms separated by ';'")
    parser.add_argument("--trials", type=int, help="trials to finish (default for --sampler grid: the grid's size)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per trial, at seeds 0 .. S-1")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trials' runs and the report")
    parser.add_argument("--storage", help="an RDB URL (sqlite:///..., postgresql://...) or a journal file path "
                        "(default OUT/study.log); several machines share a study through one storage")
    parser.add_argument("--study", default="sweep", help="the study's name in the storage")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    parser.add_argument("--metric", default="reward_mean", help="metrics.jsonl key, or eval_* from eval.jsonl")
    parser.add_argument("--last-epochs", type=int, default=3, help="epochs (evaluations for eval_*) per seed scored")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    parser.add_argument("--prune", action="store_true", help="stop a trial between seeds when its IQM so far is "
                        "below the median of other trials' at the same seed (Optuna's MedianPruner)")
    parser.add_argument("--heartbeat", type=float, default=60.0, help=f"seconds between a worker's heartbeats; a "
                        f"trial whose worker misses {STALE_BEATS} is failed and queued again")
    return parser


def parse(argv: list[str]) -> tuple[Sweep, Any]:
    """The sweep and its base config (the pass-through overrides applied), checked; a `SweepError` otherwise."""
    try:
        args, extra = build_parser().parse_known_args(argv)
    except _ArgumentError as e:
        raise SweepError(str(e)) from None
    if bad := [a for a in extra if not (a.startswith("--config.") and "=" in a)]:
        raise SweepError(f"unrecognized argument {bad[0]!r} (overrides are --config.KEY=VALUE)")
    space = parse_space(args.space)
    for name in ("seeds", "jobs", "last_epochs"):
        if getattr(args, name) < 1:
            raise SweepError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.heartbeat <= 0:
        raise SweepError(f"--heartbeat must be positive, got {args.heartbeat}")
    if args.sampler == "grid":
        if ranged := [p for p in space if p.kind != "categorical"]:
            raise SweepError(f"--sampler grid takes comma lists only; {ranged[0].key} is {ranged[0].kind}(...)")
        size = math.prod(len(p.choices) for p in space)
        args.trials = size if args.trials is None else args.trials
        if args.trials > size:
            raise SweepError(f"--trials {args.trials} is more than the grid's {size} points")
    if args.trials is None or args.trials < 1:
        raise SweepError("--trials must be at least 1" if args.trials is not None else "--trials is required")
    for override in extra:
        if override.removeprefix("--config.").split("=")[0] in RESERVED_KEYS:
            raise SweepError(f"{override}: the sweep sets it for every run")
    if not TRAIN.is_file():
        raise SweepError(f"{TRAIN} not found: the sweep runs the repository's train.py (install with pip install -e)")
    from rebel_diffusion.launch import load_training_config

    try:
        config = load_training_config(TRAIN, ["--config", args.config, *extra])
    except ValueError as e:
        raise SweepError(str(e)) from None
    check_space(space, config)
    out = args.out.resolve()
    sweep = Sweep(config=args.config, overrides=tuple(extra), space=tuple(space), trials=args.trials, seeds=args.seeds,
                  jobs=args.jobs, storage=args.storage or str(out / "study.log"), study=args.study, out=out,
                  sampler=args.sampler, metric=args.metric, last_epochs=args.last_epochs, direction=args.direction,
                  prune=args.prune, heartbeat_s=args.heartbeat)
    return sweep, config


def create_study(sweep: Sweep) -> None:
    """Create the study, or join the one in the storage if it is the same sweep; a `SweepError` if it is another."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(study_name=sweep.study, storage=open_storage(sweep.storage),
                                    direction=sweep.direction, load_if_exists=True)
    except Exception as e:  # a bad URL, a missing database driver, an unreachable server: each library its own type
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SweepError(f"cannot open --storage {sweep.storage}: {detail}") from None
    if study.direction.name.lower() != sweep.direction:
        raise SweepError(f"study {sweep.study!r} in {sweep.storage} is to {study.direction.name.lower()} its "
                         "objective; use that --direction, or another --study")
    definition = sweep.definition()
    stored = study.user_attrs.get("sweep")
    if stored is None:
        study.set_user_attr("sweep", definition)
    elif stored != definition:
        differ = ", ".join(key for key in definition if stored.get(key) != definition[key])
        raise SweepError(f"study {sweep.study!r} in {sweep.storage} is another sweep (its {differ} differ); use "
                         "another --study or --storage, or its settings")


def main(argv: list[str] | None = None) -> int:
    try:
        sweep, config = parse(sys.argv[1:] if argv is None else argv)
        sweep.out.mkdir(parents=True, exist_ok=True)
        create_study(sweep)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if sweep.jobs == 1:
        work(sweep)
    else:
        # Processes, not threads: each worker waits on its own training run and holds its own storage connection.
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=work, args=(sweep,)) for _ in range(sweep.jobs)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if failed := [w.exitcode for w in workers if w.exitcode]:
            print(f"sweep: {len(failed)} of {sweep.jobs} workers exited with {failed}", file=sys.stderr)
    return report(sweep, config)


if __name__ == "__main__":
    sys.exit(main())
