"""Compare learning curves across algorithms and seeds.

For every group of runs (e.g. all REBEL seeds, all PPO seeds) this module
computes, at each x (e.g. ``reward_queries``), the inter-quartile mean (IQM)
of a metric across runs and a percentile-bootstrap confidence interval that
resamples runs with replacement, stratified by task (Agarwal et al. 2021,
"Deep RL at the edge of the statistical precipice"; the statistics of the
``rliable`` library, recomputed here with numpy/scipy).

A run is a folder holding ``metrics.jsonl`` (one JSON object per epoch), for
held-out ``eval_*`` metrics ``eval.jsonl`` (one object per evaluation, x from
metrics.jsonl at that epoch), and optionally ``config.json``; the basename of its ``prompt_file`` entry is the
run's task label (runs without it share one unnamed task).

Common grid: runs of one group whose x values differ are linearly
interpolated (``np.interp``) onto the first run's (in sorted path order) x
values that lie inside the range every run of the group covers, plus the two
ends of that range and the final comparison point. The final comparison point
is the last x that every run of every group covers.

Only the metric and x keys are validated (present, finite numbers, x strictly
increasing); other keys such as ``loss`` may hold anything.

Outputs (written by :func:`main`):

* ``curves.csv``: ``group,x,iqm,ci_low,ci_high``, one row per group and grid x.
* ``final.csv``: ``group,iqm,ci_low,ci_high,x`` at the final comparison point,
  then one column ``prob_improvement_over_<other>`` per group: the
  probability of improvement P(this > other) as rliable defines it (mean
  over pairs of runs of 1[a > b] + 0.5 * 1[a == b], per task, averaged over
  the tasks both groups share). The diagonal cell is left empty.
* ``curves.png``: one line per group with its shaded interval.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from scipy.stats import trim_mean

#: Fraction cut from each end by the inter-quartile mean, as in rliable.
IQM_CUT = 0.25

#: Below this many runs the IQM trims nothing and the interval degenerates.
MIN_RUNS_FOR_IQM = 4

#: Array elements per bootstrap chunk: 2 MB of float64 stays in cache, which
#: measured ~2x faster than 128 MB chunks, and memory use stays small.
CHUNK_ELEMENTS = 1 << 18

#: Bootstrap IQMs held at once for the percentiles (64 MB of float64), so
#: memory does not grow with the length of the curves.
PERCENTILE_BLOCK_ELEMENTS = 1 << 23


class CompareError(Exception):
    """Bad input; the message is one line naming the run or argument at fault."""


@dataclass(frozen=True)
class Run:
    """One training run: its folder, task label and metric curve."""

    path: Path
    task: str | None
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class GroupCurve:
    """IQM curve of one group with its bootstrap interval.

    ``values`` holds the per-run metric on the grid ``x``, shape (runs, points);
    ``final_index`` is the position of the final comparison point in ``x``.
    """

    name: str
    x: np.ndarray
    values: np.ndarray
    tasks: tuple[str | None, ...]
    iqm: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    final_index: int

    @property
    def n_runs(self) -> int:
        """Number of runs in the group."""
        return self.values.shape[0]


@dataclass(frozen=True)
class Comparison:
    """Everything :func:`main` writes: curves, the final point and messages."""

    curves: list[GroupCurve]
    final_x: float
    prob_improvement: dict[tuple[str, str], float]
    notes: list[str]
    small_group_warnings: list[str]


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def parse_group_spec(spec: str) -> tuple[str, str]:
    """Split a ``NAME=GLOB`` command-line argument into name and pattern."""
    name, sep, pattern = spec.partition("=")
    if not sep or not name.strip() or not pattern.strip():
        raise CompareError(f"argument {spec!r} is not of the form NAME=GLOB")
    return name.strip(), pattern.strip()


def _number(record: dict, key: str, where: str) -> float:
    if key not in record:
        raise CompareError(f"{where}: no {key!r} key")
    value = record[key]
    # bool is an int subclass, but True is not a measurement.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompareError(f"{where}: {key!r} is {value!r}, not a number")
    if not math.isfinite(value):
        raise CompareError(f"{where}: {key!r} is {value}")
    return float(value)


def _records(path: Path) -> list[tuple[str, dict]]:
    """The JSON objects of a JSONL file with where each is (``path line N``); blank lines are skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CompareError(f"{path}: {path.name} is missing") from None
    except OSError as err:
        raise CompareError(f"{path}: cannot read ({err.strerror})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CompareError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise CompareError(f"{where}: not a JSON object")
        records.append((where, record))
    if not records:
        raise CompareError(f"{path}: {path.name} is empty")
    return records


#: x keys that count from zero at the start of training: an evaluation before the first epoch sits at 0.
ZERO_BEFORE_TRAINING = ("reward_queries", "optimizer_steps")


def _eval_points(run_dir: Path, metric: str, x_key: str) -> tuple[list[float], list[float]]:
    """``(x, metric)`` of each held-out evaluation in ``run_dir/eval.jsonl``.

    An evaluation at ``epoch`` e comes after e epochs of training: its x is its own ``x_key`` when it has one (the
    ``epoch``), else the ``x_key`` of metrics.jsonl's line for epoch e - 1 (the reward queries spent by then), and 0
    for e = 0 when x is a count that starts there (``reward_queries``, ``optimizer_steps``).
    """
    evals = _records(run_dir / "eval.jsonl")
    by_epoch: dict[float, tuple[str, dict]] = {}
    if any(x_key not in record for _, record in evals):
        for where, record in _records(run_dir / "metrics.jsonl"):
            by_epoch[_number(record, "epoch", where)] = (where, record)
    xs: list[float] = []
    ys: list[float] = []
    for where, record in evals:
        ys.append(_number(record, metric, where))
        if x_key in record:
            xs.append(_number(record, x_key, where))
            continue
        epoch = _number(record, "epoch", where)
        if epoch == 0 and x_key in ZERO_BEFORE_TRAINING:
            xs.append(0.0)
        elif epoch - 1 in by_epoch:
            xs.append(_number(by_epoch[epoch - 1][1], x_key, by_epoch[epoch - 1][0]))
        else:
            raise CompareError(f"{where}: no metrics.jsonl line for epoch {epoch - 1:g}, the epoch before this "
                               f"evaluation, to take its {x_key!r} from")
    return xs, ys


def read_metrics(run_dir: Path, metric: str, x_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(x, metric)`` per epoch from ``run_dir/metrics.jsonl``, or per held-out evaluation from
    ``run_dir/eval.jsonl`` for an ``eval_*`` metric (x as in ``_eval_points``).

    Blank lines are skipped. x must be strictly increasing so that the curve
    can be interpolated.
    """
    if metric.startswith("eval_"):
        path = run_dir / "eval.jsonl"
        xs, ys = _eval_points(run_dir, metric, x_key)
    else:
        path = run_dir / "metrics.jsonl"
        records = _records(path)
        xs = [_number(record, x_key, where) for where, record in records]
        ys = [_number(record, metric, where) for where, record in records]
    x = np.array(xs)
    if np.any(np.diff(x) <= 0):
        raise CompareError(f"{path}: {x_key!r} is not strictly increasing")
    return x, np.array(ys)


def read_task(run_dir: Path) -> str | None:
    """Task label of a run: basename of ``prompt_file`` in its ``config.json``."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CompareError(f"{path}: unreadable config ({err})") from None
    if not isinstance(config, dict) or not config.get("prompt_file"):
        return None
    return os.path.basename(str(config["prompt_file"]))


def load_run(run_dir: Path, metric: str, x_key: str) -> Run:
    """Load one run folder."""
    x, y = read_metrics(run_dir, metric, x_key)
    return Run(path=run_dir, task=read_task(run_dir), x=x, y=y)


def load_group(name: str, pattern: str, metric: str, x_key: str) -> list[Run]:
    """Load every run folder matched by ``pattern``, in sorted path order."""
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    # The glob may also match stray files next to the run folders.
    run_dirs = [Path(m) for m in matches if os.path.isdir(m)]
    if not run_dirs:
        raise CompareError(f"group {name!r}: pattern {pattern!r} matched no run folder")
    return [load_run(d, metric, x_key) for d in run_dirs]


# --------------------------------------------------------------------------
# Common grid
# --------------------------------------------------------------------------


def common_range(runs: Sequence[Run]) -> tuple[float, float]:
    """The x range ``[lo, hi]`` that every run covers."""
    latest_start = max(runs, key=lambda r: r.x[0])
    earliest_end = min(runs, key=lambda r: r.x[-1])
    lo, hi = float(latest_start.x[0]), float(earliest_end.x[-1])
    if lo > hi:
        raise CompareError(
            f"{earliest_end.path}: its x values end at {hi:g}, before run "
            f"{latest_start.path} starts at {lo:g}; the runs share no x range"
        )
    return lo, hi


def common_grid(runs: Sequence[Run], extra: Sequence[float] = ()) -> np.ndarray:
    """Grid for a group: the first run's x inside the common range, its ends and ``extra``.

    Using the first run's x (rather than the union over runs) keeps the grid
    as long as one run's curve, so the bootstrap cost does not grow with the
    number of seeds when their x values jitter.
    """
    lo, hi = common_range(runs)
    first = runs[0].x
    inside = first[(first >= lo) & (first <= hi)]
    return np.union1d(inside, np.array([lo, hi, *extra], dtype=float))


def interpolate_runs(runs: Sequence[Run], grid: np.ndarray) -> np.ndarray:
    """Each run's metric linearly interpolated onto ``grid``, shape (runs, points)."""
    return np.stack([np.interp(grid, r.x, r.y) for r in runs])


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of independent `values` (seeds' runs, prompts) and its `level` Student-t interval,
    `mean +- t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`; NaN bounds for fewer than two values."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Inter-quartile mean along ``axis`` (``trim_mean`` cutting 25% each end)."""
    return trim_mean(values, IQM_CUT, axis=axis)


def stratified_indices(
    tasks: Sequence[str | None], reps: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap resamples of run indices, shape (reps, runs).

    Each resample draws, within each task, as many runs with replacement as
    that task has, so every resample keeps the task proportions.
    """
    tasks = list(tasks)
    columns = []
    for task in dict.fromkeys(tasks):  # unique, first-seen order; None is a task
        members = np.array([i for i, t in enumerate(tasks) if t == task])
        columns.append(members[rng.integers(0, len(members), size=(reps, len(members)))])
    return np.concatenate(columns, axis=1)


def resample_iqm(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """IQM of each resample, shape (points, reps).

    ``values`` has shape (runs, points) and ``indices`` (reps, runs); the
    result equals ``iqm(values[idx])`` for every row ``idx`` of ``indices``.

    Materialising and sorting every resample (reps x runs x points) is
    memory-bound and slow, so instead: at each point, sort the n runs once
    (v_1 <= ... <= v_n) and let S_j count the draws of a resample that fall
    on the j lowest runs. The IQM keeps sorted positions [k, n - k) with
    k = int(0.25 * n) (the cut of ``trim_mean``), so sorted run j carries
    weight G_j - G_{j-1} with G_j = clip(S_j, k, n - k), and summing by parts

        (n - 2k) * IQM = (n - k) v_n - k v_1 - sum_{j<n} G_j (v_{j+1} - v_j).

    S for a chunk of resamples is one product of their run counts.
    """
    n_runs, n_points = values.shape
    reps = indices.shape[0]
    cut = int(IQM_CUT * n_runs)
    order = np.argsort(values, axis=0, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=0)
    gaps = np.diff(sorted_values, axis=0)  # (runs - 1, points)
    ranks = np.empty_like(order)
    ranks[order, np.arange(n_points)] = np.arange(n_runs)[:, None]
    # lowest[i, j, p] = 1 when run i is among the j + 1 lowest runs at point p.
    lowest = ranks[:, None, :] <= np.arange(n_runs - 1)[None, :, None]
    lowest = lowest.reshape(n_runs, -1).astype(float)
    # counts[r, i] = how often run i is drawn in resample r.
    flat = (indices + n_runs * np.arange(reps)[:, None]).ravel()
    counts = np.bincount(flat, minlength=reps * n_runs).reshape(reps, n_runs).astype(float)
    ends = (n_runs - cut) * sorted_values[-1] - cut * sorted_values[0]
    out = np.empty((n_points, reps))
    chunk = max(1, CHUNK_ELEMENTS // max(1, (n_runs - 1) * n_points))
    for start in range(0, reps, chunk):
        # S_j flattened over (j, point). einsum rather than @ on purpose: this
        # product is memory-bound, and multithreaded BLAS measured 10-30x
        # slower when the cores are busy with other work.
        below = np.einsum("ri,ik->rk", counts[start : start + chunk], lowest)
        np.clip(below, cut, n_runs - cut, out=below)
        inner = np.einsum("cjp,jp->pc", below.reshape(len(below), n_runs - 1, n_points), gaps)
        out[:, start : start + chunk] = (ends[:, None] - inner) / (n_runs - 2 * cut)
    return out


def bootstrap_iqm_ci(
    values: np.ndarray,
    tasks: Sequence[str | None],
    reps: int,
    rng: np.random.Generator,
    confidence: float = 0.95,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM across runs and its stratified percentile-bootstrap interval.

    ``values`` has shape (runs, points); returns ``(iqm, ci_low, ci_high)``,
    each of shape (points,).
    """
    values = np.asarray(values, dtype=float)
    indices = stratified_indices(tasks, reps, rng)  # the same resamples at every point
    tail = 100 * (1 - confidence) / 2
    n_points = values.shape[1]
    low, high = np.empty(n_points), np.empty(n_points)
    block = max(1, PERCENTILE_BLOCK_ELEMENTS // reps)
    for start in range(0, n_points, block):
        boot = resample_iqm(values[:, start : start + block], indices)
        low[start : start + block], high[start : start + block] = np.percentile(
            boot, [tail, 100 - tail], axis=1
        )
    return iqm(values, axis=0), low, high


def probability_of_improvement(
    a: np.ndarray,
    a_tasks: Sequence[str | None],
    b: np.ndarray,
    b_tasks: Sequence[str | None],
) -> float:
    """P(A > B) as in rliable: per task, the mean over pairs of runs (a, b) of
    1[a > b] + 0.5 * 1[a == b], averaged over the tasks both groups have.

    If the groups share no task, all runs are pooled as one task.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a_tasks, b_tasks = np.array(a_tasks, dtype=object), np.array(b_tasks, dtype=object)
    shared = [t for t in dict.fromkeys(a_tasks) if t in set(b_tasks)]
    if shared:
        pairs = [(a[a_tasks == t], b[b_tasks == t]) for t in shared]
    else:
        pairs = [(a, b)]
    per_task = []
    for a_t, b_t in pairs:
        diff = a_t[:, None] - b_t[None, :]
        per_task.append(np.mean((diff > 0) + 0.5 * (diff == 0)))
    return float(np.mean(per_task))


def small_group_warning(name: str, n_runs: int, confidence: float) -> str:
    """Plain statement of what the IQM and its interval mean for < 4 runs."""
    # A percentile interval of resamples of n runs never leaves their
    # min-max range, which covers the median of a continuous distribution
    # with probability 1 - 2 * 0.5**n (75% for 3 runs).
    coverage = 1 - 2 * 0.5**n_runs
    return (
        f"warning: group {name!r} has only {n_runs} run(s) (< {MIN_RUNS_FOR_IQM}): "
        f"its IQM is the plain mean, and its {confidence:.0%} percentile interval is "
        f"at most the min-max range of its runs (real coverage about {coverage:.0%})"
    )


def compare_groups(
    groups: dict[str, list[Run]], reps: int, seed: int, confidence: float
) -> Comparison:
    """Interpolate, bootstrap and compare the groups (order as given).

    One ``np.random.default_rng(seed)`` draws the resamples of all groups in
    order, so the output is reproducible for a given seed and group order.
    """
    if reps < 1:
        raise CompareError(f"--reps must be at least 1, got {reps}")
    if not 0 < confidence < 1:
        raise CompareError(f"--confidence must be between 0 and 1, got {confidence}")
    # The end of the range shared by all runs; common_range also checks they overlap.
    _, final_x = common_range([r for runs in groups.values() for r in runs])
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    warnings: list[str] = []
    curves: list[GroupCurve] = []
    for name, runs in groups.items():
        grid = common_grid(runs, extra=[final_x])
        if any(not np.array_equal(r.x, grid) for r in runs):
            notes.append(
                f"note: group {name!r}: runs' x values differ (or miss the final point "
                f"x={final_x:g}); interpolated linearly onto {len(grid)} common points "
                f"in [{grid[0]:g}, {grid[-1]:g}]"
            )
        if len(runs) < MIN_RUNS_FOR_IQM:
            warnings.append(small_group_warning(name, len(runs), confidence))
        values = interpolate_runs(runs, grid)
        tasks = tuple(r.task for r in runs)
        center, low, high = bootstrap_iqm_ci(values, tasks, reps, rng, confidence)
        final_index = int(np.flatnonzero(grid == final_x)[0])
        curves.append(GroupCurve(name, grid, values, tasks, center, low, high, final_index))

    prob_improvement: dict[tuple[str, str], float] = {}
    for i, a in enumerate(curves):
        for j, b in enumerate(curves):
            if i == j:
                continue
            if i < j and set(a.tasks).isdisjoint(b.tasks):
                notes.append(
                    f"note: groups {a.name!r} and {b.name!r} share no task; their "
                    "probability of improvement pools all runs"
                )
            prob_improvement[(a.name, b.name)] = probability_of_improvement(
                a.values[:, a.final_index], a.tasks, b.values[:, b.final_index], b.tasks
            )
    return Comparison(curves, final_x, prob_improvement, notes, warnings)


# --------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------


def write_curves_csv(result: Comparison, path: Path) -> None:
    """Write ``group,x,iqm,ci_low,ci_high`` for every group and grid point."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "x", "iqm", "ci_low", "ci_high"])
        for c in result.curves:
            for row in zip(c.x, c.iqm, c.ci_low, c.ci_high):
                writer.writerow([c.name, *(float(v) for v in row)])


def write_final_csv(result: Comparison, path: Path) -> None:
    """Write the final-point IQM, interval and probabilities of improvement."""
    names = [c.name for c in result.curves]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["group", "iqm", "ci_low", "ci_high", "x"]
            + [f"prob_improvement_over_{n}" for n in names]
        )
        for c in result.curves:
            i = c.final_index
            probs = [
                "" if other == c.name else result.prob_improvement[(c.name, other)]
                for other in names
            ]
            writer.writerow(
                [c.name, float(c.iqm[i]), float(c.ci_low[i]), float(c.ci_high[i]),
                 result.final_x, *probs]
            )


def plot_curves(
    result: Comparison, path: Path, metric: str, x_key: str, reps: int, confidence: float
) -> Figure:
    """Save the IQM curves with shaded intervals as a PNG (Agg backend).

    Returns the figure so callers can inspect it.
    """
    stratified = any(len(set(c.tasks)) > 1 for c in result.curves)
    caption = [
        f"Lines: IQM across runs. Bands: {confidence:.0%} percentile bootstrap over runs "
        f"({reps} resamples{', stratified by task' if stratified else ''})."
    ]
    caption += [
        f"{c.name} (n={c.n_runs}): fewer than {MIN_RUNS_FOR_IQM} runs, so the IQM is the "
        f"plain mean and the band is at most the min-max of the runs "
        f"(real coverage about {1 - 2 * 0.5**c.n_runs:.0%})."
        for c in result.curves
        if c.n_runs < MIN_RUNS_FOR_IQM
    ]
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    fig = Figure(figsize=(7, 4.5 + 0.25 * len(caption)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c in result.curves:
        (line,) = ax.plot(c.x, c.iqm, label=f"{c.name} (n={c.n_runs})")
        ax.fill_between(c.x, c.ci_low, c.ci_high, color=line.get_color(), alpha=0.25)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(f"IQM of {metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    # Leave room below the x label for the caption lines.
    fig.subplots_adjust(bottom=0.13 + 0.04 * len(caption))
    fig.text(0.02, 0.02, "\n".join(caption), fontsize=7, ha="left", va="bottom", wrap=True)
    fig.savefig(path, dpi=120)
    return fig


def summary_table(result: Comparison, x_key: str, confidence: float) -> str:
    """Final IQM and interval per group as a small text table."""
    width = max(5, *(len(c.name) for c in result.curves))
    lines = [
        f"final comparison at {x_key} = {result.final_x:g} (last x covered by every run)",
        f"{'group':<{width}}  {'n':>3}  {'IQM':>11}  {confidence:.0%} CI",
    ]
    for c in result.curves:
        i = c.final_index
        lines.append(
            f"{c.name:<{width}}  {c.n_runs:>3}  {c.iqm[i]:>11.5g}  "
            f"[{c.ci_low[i]:.5g}, {c.ci_high[i]:.5g}]"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``compare_curves`` command."""
    parser = argparse.ArgumentParser(
        description="IQM learning curves with stratified bootstrap CIs across seeds.",
    )
    parser.add_argument("groups", nargs="+", metavar="NAME=GLOB",
                        help="a group of run folders, e.g. rebel='runs/figure3/rebel_seed*'")
    parser.add_argument("--metric", default="reward_mean",
                        help="y value: a metrics.jsonl key, or an eval.jsonl key (eval_*, e.g. eval_shape_accuracy)")
    parser.add_argument("--x", default="reward_queries",
                        help="x value: a metrics.jsonl key (for eval_* metrics taken at the evaluation's epoch), or epoch")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the process exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        groups: dict[str, list[Run]] = {}
        for spec in args.groups:
            name, pattern = parse_group_spec(spec)
            if name in groups:
                raise CompareError(f"argument {spec!r}: group name {name!r} given twice")
            groups[name] = load_group(name, pattern, args.metric, args.x)
        result = compare_groups(groups, args.reps, args.seed, args.confidence)
        for message in result.notes + result.small_group_warnings:
            print(message)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            write_curves_csv(result, args.out / "curves.csv")
            write_final_csv(result, args.out / "final.csv")
            plot_curves(result, args.out / "curves.png", args.metric, args.x,
                        args.reps, args.confidence)
        except OSError as err:
            raise CompareError(f"{args.out}: cannot write outputs ({err})") from None
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(result, args.x, args.confidence))
    print(f"wrote {args.out / 'curves.csv'}, {args.out / 'final.csv'}, {args.out / 'curves.png'}")
    return 0
