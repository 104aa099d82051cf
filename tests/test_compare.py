"""Tests for rebel_diffusion.compare (IQM curves with stratified bootstrap CIs)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import trim_mean

from rebel_diffusion import compare
from rebel_diffusion.compare import (
    CompareError,
    Run,
    bootstrap_iqm_ci,
    common_grid,
    compare_groups,
    interpolate_runs,
    iqm,
    main,
    plot_curves,
    probability_of_improvement,
    resample_iqm,
    stratified_indices,
)

REPO = Path(__file__).resolve().parents[1]


def write_run(
    path: Path,
    xs: list[float],
    ys: list[float],
    prompt_file: str | None = None,
) -> Path:
    """A run folder with a metrics.jsonl like the trainer's and optional config.json."""
    path.mkdir(parents=True)
    lines = [
        json.dumps({
            "epoch": i, "reward_mean": y, "reward_std": 0.1, "reward_queries": x,
            "loss": 0.5, "lr": 1e-4, "seconds": 3.0,
        })
        for i, (x, y) in enumerate(zip(xs, ys))
    ]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if prompt_file is not None:
        (path / "config.json").write_text(json.dumps({"prompt_file": prompt_file, "lr": 1e-4}))
    return path


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


# --- IQM -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # 3 runs: int(0.25 * 3) = 0 cut, so the plain mean.
        ([5.0, 1.0, 9.0], (5 + 1 + 9) / 3),
        # 4 runs: sorted 2, 4, 7, 10; cut 1 each end.
        ([10.0, 2.0, 7.0, 4.0], (4 + 7) / 2),
        # 5 runs: sorted -50, 1, 3, 4, 100; cut int(1.25) = 1 each end.
        ([3.0, 100.0, 1.0, 4.0, -50.0], (1 + 3 + 4) / 3),
        # 8 runs: sorted 0, 1, 1, 3, 4, 5, 9, 10; the middle four.
        ([10.0, 0.0, 3.0, 1.0, 4.0, 1.0, 5.0, 9.0], (1 + 3 + 4 + 5) / 4),
    ],
    ids=["3runs", "4runs", "5runs", "8runs"],
)
def test_iqm_matches_hand_computation(values: list[float], expected: float) -> None:
    assert iqm(np.array(values)) == pytest.approx(expected)
    # The curve code path (runs x points) gives the same centre.
    center, low, high = bootstrap_iqm_ci(
        np.array(values)[:, None], [None] * len(values), 500, np.random.default_rng(0)
    )
    assert center[0] == pytest.approx(expected)
    assert low[0] <= expected <= high[0]


@pytest.mark.parametrize("n_runs", [1, 2, 3, 4, 5, 7, 8, 10, 13])
def test_resample_iqm_equals_trim_mean_of_each_resample(n_runs: int) -> None:
    rng = np.random.default_rng(n_runs)
    values = rng.normal(size=(n_runs, 6))
    values[:, 0] = 1.5  # all tied
    values[0, 1] = values[-1, 1]  # one tie
    indices = rng.integers(0, n_runs, size=(300, n_runs))
    expected = np.stack([trim_mean(values[idx], 0.25, axis=0) for idx in indices], axis=1)
    np.testing.assert_allclose(resample_iqm(values, indices), expected, rtol=0, atol=1e-12)


def test_bootstrap_interval_covers_true_mean_at_nominal_rate() -> None:
    # IQM of a normal distribution equals its mean (symmetry).
    rng = np.random.default_rng(123)
    true_mean, experiments, hits = 3.0, 200, 0
    for _ in range(experiments):
        runs = rng.normal(true_mean, 2.0, size=(20, 1))
        _, low, high = bootstrap_iqm_ci(runs, [None] * 20, 2000, rng, confidence=0.95)
        hits += bool(low[0] <= true_mean <= high[0])
    assert 0.88 <= hits / experiments <= 0.99


def test_interval_of_three_runs_is_their_min_max_range() -> None:
    # What the small-group warning claims: with 3 runs the IQM is the mean and
    # the 95% percentile interval is exactly the min-max range.
    values = np.array([[1.0], [4.0], [10.0]])
    center, low, high = bootstrap_iqm_ci(values, [None] * 3, 20_000, np.random.default_rng(0))
    assert center[0] == pytest.approx(5.0)
    assert (low[0], high[0]) == (1.0, 10.0)


def test_lower_confidence_gives_narrower_interval() -> None:
    values = np.random.default_rng(0).normal(size=(12, 3))
    _, low95, high95 = bootstrap_iqm_ci(values, [None] * 12, 5000, np.random.default_rng(1), 0.95)
    _, low50, high50 = bootstrap_iqm_ci(values, [None] * 12, 5000, np.random.default_rng(1), 0.5)
    assert np.all(high50 - low50 < high95 - low95)


# --- Stratification ----------------------------------------------------------


def test_stratified_indices_never_mix_tasks() -> None:
    tasks = ["a", "b", "a", None, "b", "b"]
    indices = stratified_indices(tasks, 5000, np.random.default_rng(0))
    assert indices.shape == (5000, 6)
    task_of = np.array(tasks, dtype=object)[indices]
    # Every resample keeps the task proportions: 2 x "a", 3 x "b", 1 x no task.
    assert np.all((task_of == "a").sum(axis=1) == 2)
    assert np.all((task_of == "b").sum(axis=1) == 3)
    assert np.all(indices[task_of == None] == 3)  # noqa: E711 (elementwise)
    # Within a task, runs are drawn with replacement (both "a" runs show up alone).
    a_draws = np.sort(indices[task_of == "a"].reshape(5000, 2), axis=1)
    assert {(0, 0), (2, 2), (0, 2)} <= set(map(tuple, a_draws.tolist()))


def test_stratified_bootstrap_keeps_task_proportion() -> None:
    # Two tasks on very different scales. Stratified resamples always hold two
    # runs of each, so the IQM (middle two of four) stays in [50, 51]; an
    # unstratified bootstrap sometimes draws only task-a runs.
    values = np.array([[0.0], [1.0], [100.0], [101.0]])
    tasks = ["a", "a", "b", "b"]
    _, low, high = bootstrap_iqm_ci(values, tasks, 4000, np.random.default_rng(0))
    assert 50.0 <= low[0] <= high[0] <= 51.0
    _, low_pooled, _ = bootstrap_iqm_ci(values, [None] * 4, 4000, np.random.default_rng(0))
    assert low_pooled[0] < 2.0


# --- Probability of improvement ------------------------------------------------


def test_probability_of_improvement_by_hand() -> None:
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.0])
    # a=1 beats 0 (1); a=2 ties 2, 2 and beats 0 (0.5 + 0.5 + 1); a=3 beats all (3).
    assert probability_of_improvement(a, [None] * 3, b, [None] * 3) == pytest.approx(6 / 9)
    assert probability_of_improvement(b, [None] * 3, a, [None] * 3) == pytest.approx(3 / 9)


def test_probability_of_improvement_averages_over_shared_tasks() -> None:
    a = np.array([1.0, 2.0, 10.0, 20.0])
    b = np.array([0.0, 15.0, 15.0, 99.0])
    a_tasks = ["t1", "t1", "t2", "t2"]
    b_tasks = ["t1", "t2", "t2", "t3"]  # t3 has no a-runs: ignored
    # t1: a in {1, 2} vs b in {0}: 1. t2: a in {10, 20} vs b in {15, 15}: 2/4.
    assert probability_of_improvement(a, a_tasks, b, b_tasks) == pytest.approx((1 + 0.5) / 2)


# --- Common grid -----------------------------------------------------------------


def test_runs_with_different_x_are_interpolated_onto_common_range() -> None:
    runs = [
        Run(Path("r0"), None, np.array([0.0, 10.0, 20.0, 30.0]), np.array([0.0, 1.0, 2.0, 3.0])),
        Run(Path("r1"), None, np.array([5.0, 15.0, 25.0, 35.0]), np.array([5.0, 15.0, 25.0, 35.0])),
    ]
    grid = common_grid(runs)
    # The first run's x inside [5, 30] (the range both cover) plus the ends.
    np.testing.assert_array_equal(grid, [5.0, 10.0, 20.0, 30.0])
    values = interpolate_runs(runs, grid)
    np.testing.assert_allclose(values[0], [0.5, 1.0, 2.0, 3.0])  # y = x / 10
    np.testing.assert_allclose(values[1], [5.0, 10.0, 20.0, 30.0])  # y = x


def test_final_point_is_last_x_shared_by_all_groups() -> None:
    x_long, x_short = np.arange(0.0, 60.0, 10.0), np.arange(0.0, 45.0, 15.0)  # ends 50, 30
    groups = {
        "long": [Run(Path(f"l{i}"), None, x_long, x_long + i) for i in range(4)],
        "short": [Run(Path(f"s{i}"), None, x_short, -x_short - i) for i in range(4)],
    }
    result = compare_groups(groups, reps=200, seed=0, confidence=0.95)
    assert result.final_x == 30.0
    long_curve, short_curve = result.curves
    # The long group keeps its own x up to 50 and has the final point on its grid.
    np.testing.assert_array_equal(long_curve.x, x_long)
    assert long_curve.x[long_curve.final_index] == 30.0
    assert long_curve.iqm[long_curve.final_index] == pytest.approx(30.0 + 1.5)
    assert result.prob_improvement[("long", "short")] == 1.0
    assert result.prob_improvement[("short", "long")] == 0.0
    assert not result.notes  # same x within each group, final x on both grids


def test_groups_without_overlap_are_an_error() -> None:
    groups = {
        "early": [Run(Path("e0"), None, np.array([0.0, 1.0]), np.array([0.0, 1.0]))],
        "late": [Run(Path("l0"), None, np.array([5.0, 6.0]), np.array([0.0, 1.0]))],
    }
    with pytest.raises(CompareError, match="share no x range"):
        compare_groups(groups, reps=10, seed=0, confidence=0.95)


# --- End to end ----------------------------------------------------------------------


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """3 REBEL seeds (one task) and 5 PPO seeds (two tasks), 6 epochs each."""
    rng = np.random.default_rng(0)
    xs = [0, 256, 512, 768, 1024, 1280]
    for seed in range(3):
        ys = [0.1 * i + 0.5 + rng.normal(0, 0.05) for i in range(6)]
        write_run(tmp_path / "runs" / f"rebel_seed{seed}", xs, ys, "prompts/animals.txt")
    for seed in range(5):
        ys = [0.05 * i + 0.5 + rng.normal(0, 0.05) for i in range(6)]
        task = "prompts/animals.txt" if seed < 3 else "prompts/simple.txt"
        write_run(tmp_path / "runs" / f"ppo_seed{seed}", xs, ys, task)
    return tmp_path / "runs"


def test_cli_writes_curves_final_and_plot(
    runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "nested"
    code = main([
        f"rebel={runs_dir}/rebel_seed*", f"ppo={runs_dir}/ppo_seed*",
        "--metric", "reward_mean", "--x", "reward_queries", "--out", str(out),
        "--reps", "2000", "--seed", "0",
    ])
    stdout = capsys.readouterr().out
    assert code == 0

    curves = read_csv(out / "curves.csv")
    assert curves[0] == ["group", "x", "iqm", "ci_low", "ci_high"]
    assert len(curves) == 1 + 2 * 6
    assert [row[0] for row in curves[1:]] == ["rebel"] * 6 + ["ppo"] * 6
    for _, _, center, low, high in curves[1:]:
        assert float(low) <= float(center) <= float(high)

    final = read_csv(out / "final.csv")
    assert final[0] == [
        "group", "iqm", "ci_low", "ci_high", "x",
        "prob_improvement_over_rebel", "prob_improvement_over_ppo",
    ]
    assert len(final) == 3
    rebel, ppo = final[1], final[2]
    assert float(rebel[4]) == float(ppo[4]) == 1280.0
    assert rebel[5] == "" and ppo[6] == ""  # no self-comparison
    # P(A > B) + P(B > A) = 1 on the shared task (prompts/animals.txt).
    assert float(rebel[6]) + float(ppo[5]) == pytest.approx(1.0)
    assert float(rebel[6]) > 0.5  # rebel was made to climb faster
    # The final row repeats the curves' last row.
    assert rebel[1:4] == curves[6][2:5]

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Plain warning for the 3-run group only; the summary table names both groups.
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'rebel'" in warnings[0]
    assert "plain mean" in warnings[0] and "75%" in warnings[0]
    assert "interpolated" not in stdout
    assert "final comparison at reward_queries = 1280" in stdout
    assert any(line.startswith("rebel") and "[" in line for line in stdout.splitlines())
    assert any(line.startswith("ppo") and "[" in line for line in stdout.splitlines())


def test_plot_has_labels_legend_counts_and_small_group_caption(
    runs_dir: Path, tmp_path: Path
) -> None:
    groups = {
        name: compare.load_group(name, f"{runs_dir}/{name}_seed*", "reward_mean", "reward_queries")
        for name in ("rebel", "ppo")
    }
    result = compare_groups(groups, reps=200, seed=0, confidence=0.95)
    fig = plot_curves(result, tmp_path / "c.png", "reward_mean", "reward_queries", 200, 0.95)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "reward_queries" and ax.get_ylabel() == "reward_mean"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rebel (n=3)", "ppo (n=5)"]
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "rebel (n=3)" in caption and "plain mean" in caption
    assert "ppo (n=5)" not in caption
    assert "stratified by task" in caption


def test_cli_reports_interpolation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "a0", [0, 10, 20, 30], [0, 1, 2, 3])
    write_run(tmp_path / "a1", [5, 15, 25, 35], [0, 1, 2, 3])
    code = main([f"a={tmp_path}/a*", "--out", str(tmp_path / "out"), "--reps", "100"])
    assert code == 0
    assert "interpolated linearly onto 4 common points in [5, 30]" in capsys.readouterr().out
    assert len(read_csv(tmp_path / "out" / "curves.csv")) == 1 + 4


def test_script_entry_point_runs_from_repo_root(runs_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/compare_curves.py", f"ppo={runs_dir}/ppo_seed*",
         "--out", str(tmp_path / "o"), "--reps", "100"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "final.csv").exists()


# --- Bad input -------------------------------------------------------------------------


def _bad_metrics(text: str) -> Callable[[Path], None]:
    """A maker of a run folder whose metrics.jsonl holds ``text``."""

    def make(run: Path) -> None:
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(text)
    return make


GOOD_LINE = '{"epoch": 0, "reward_mean": 0.5, "reward_queries": 64}\n'


@pytest.mark.parametrize(
    ("make_bad_run", "problem"),
    [
        (lambda run: run.mkdir(parents=True), "metrics.jsonl is missing"),
        (_bad_metrics(""), "metrics.jsonl is empty"),
        (_bad_metrics("\n  \n"), "metrics.jsonl is empty"),
        (_bad_metrics(GOOD_LINE + '{"epoch": 1, "reward_mean": 0.'), "line 2: not valid JSON"),
        (_bad_metrics(GOOD_LINE + "[1, 2]\n"), "line 2: not a JSON object"),
        (_bad_metrics(GOOD_LINE + '{"epoch": 1, "reward_queries": 128}\n'), "line 2: no 'reward_mean' key"),
        (_bad_metrics('{"epoch": 0, "reward_mean": 0.5}\n'), "line 1: no 'reward_queries' key"),
        (_bad_metrics(GOOD_LINE + '{"reward_mean": NaN, "reward_queries": 128}\n'), "'reward_mean' is nan"),
        (_bad_metrics(GOOD_LINE + '{"reward_mean": "high", "reward_queries": 128}\n'), "not a number"),
        (_bad_metrics(GOOD_LINE + GOOD_LINE), "'reward_queries' is not strictly increasing"),
    ],
    ids=["missing", "empty", "blank", "unparseable", "not-object", "no-metric", "no-x",
         "nan", "string", "x-not-increasing"],
)
def test_bad_run_gives_one_line_naming_the_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_bad_run: Callable[[Path], None],
    problem: str,
) -> None:
    write_run(tmp_path / "runs" / "ok_seed0", [64, 128], [0.5, 0.6])
    bad = tmp_path / "runs" / "bad_seed1"
    make_bad_run(bad)
    code = main([f"ok={tmp_path}/runs/ok_*", f"bad={tmp_path}/runs/bad_*",
                 "--out", str(tmp_path / "out"), "--reps", "10"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert str(bad) in err and problem in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["rebel"], "argument 'rebel' is not of the form NAME=GLOB"),
        (["=runs/*"], "not of the form NAME=GLOB"),
        (["rebel={tmp}/nothing_here*"], "pattern '{tmp}/nothing_here*' matched no run folder"),
        (["a={tmp}/ok*", "a={tmp}/ok*"], "group name 'a' given twice"),
        (["a={tmp}/ok*", "--reps", "0"], "--reps must be at least 1"),
        (["a={tmp}/ok*", "--confidence", "95"], "--confidence must be between 0 and 1"),
    ],
    ids=["no-equals", "no-name", "glob-matches-nothing", "duplicate-name", "reps", "confidence"],
)
def test_bad_arguments_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], problem: str
) -> None:
    write_run(tmp_path / "ok0", [1, 2], [0.5, 0.6])
    argv = [a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert problem.format(tmp=tmp_path) in err


def test_unreadable_config_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_run(tmp_path / "r0", [1, 2], [0.5, 0.6])
    (run / "config.json").write_text("{not json")
    assert main([f"r={tmp_path}/r*", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(run / "config.json") in err


# --- Speed -----------------------------------------------------------------------------


def test_bootstrap_speed_3_groups_10_runs_200_points_50k_reps() -> None:
    rng = np.random.default_rng(0)
    groups = [rng.normal(size=(10, 200)) for _ in range(3)]
    tasks = ["t1"] * 5 + ["t2"] * 5
    start = time.perf_counter()
    for values in groups:
        center, low, high = bootstrap_iqm_ci(values, tasks, 50_000, rng)
    elapsed = time.perf_counter() - start
    assert elapsed < 15.0, f"bootstrap took {elapsed:.1f} s"
    assert center.shape == low.shape == high.shape == (200,)
    assert np.all(low < high)


def test_groups_without_shared_task_pool_runs_with_one_note() -> None:
    x = np.array([0.0, 1.0])
    groups = {
        "a": [Run(Path(f"a{i}"), "cats.txt", x, x + i) for i in range(2)],  # finals 1, 2
        "b": [Run(Path(f"b{i}"), "dogs.txt", x, x + 0.5 + i) for i in range(2)],  # 1.5, 2.5
    }
    result = compare_groups(groups, reps=100, seed=0, confidence=0.95)
    # Pooled pairs: 1 vs (1.5, 2.5) -> 0, 2 vs (1.5, 2.5) -> 1; mean 1/4.
    assert result.prob_improvement[("a", "b")] == pytest.approx(0.25)
    assert [n for n in result.notes if "share no task" in n] == [
        "note: groups 'a' and 'b' share no task; their probability of improvement pools all runs"
    ]


# --- Held-out metrics (eval.jsonl) ---------------------------------------------------------------


def write_eval(run: Path, epochs: list[int], accuracies: list[float]) -> None:
    """An eval.jsonl like the trainer's: the held-out metrics after `epoch` epochs of training."""
    lines = [json.dumps({"epoch": e, "eval_shape_accuracy": a, "eval_diversity": 0.2}) for e, a in zip(epochs, accuracies)]
    (run / "eval.jsonl").write_text("\n".join(lines) + "\n")


def test_eval_metrics_are_read_from_eval_jsonl_at_the_reward_queries_spent_by_then(tmp_path: Path) -> None:
    # Six epochs of 24 queries: metrics line e holds the count after epoch e, i.e. 24 (e + 1).
    run = write_run(tmp_path / "rebel_0", [24, 48, 72, 96, 120, 144], [0.1] * 6)
    write_eval(run, [0, 2, 4, 6], [0.25, 0.5, 0.5, 0.75])
    x, y = compare.read_metrics(run, "eval_shape_accuracy", "reward_queries")
    assert x.tolist() == [0, 48, 96, 144]  # before training; after 2, 4 and 6 epochs
    assert y.tolist() == [0.25, 0.5, 0.5, 0.75]
    x, _ = compare.read_metrics(run, "eval_shape_accuracy", "epoch")
    assert x.tolist() == [0, 2, 4, 6]
    with pytest.raises(CompareError, match="before this evaluation"):
        compare.read_metrics(run, "eval_shape_accuracy", "seconds")  # no 'seconds' before the first epoch
    with pytest.raises(CompareError, match="eval.jsonl line 1: no 'eval_missing' key"):
        compare.read_metrics(run, "eval_missing", "reward_queries")


def test_cli_compares_a_held_out_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed, after in enumerate([0.5, 0.75]):
        write_eval(write_run(tmp_path / "runs" / f"rebel_{seed}", [24, 48], [0.1, 0.2]), [0, 2], [0.25, after])
        write_eval(write_run(tmp_path / "runs" / f"ppo_{seed}", [24, 48], [0.1, 0.2]), [0, 2], [0.25, 0.25])
    out = tmp_path / "out"
    code = main([f"rebel={tmp_path}/runs/rebel_*", f"ppo={tmp_path}/runs/ppo_*", "--metric", "eval_shape_accuracy",
                 "--out", str(out), "--reps", "200"])
    assert code == 0, capsys.readouterr().err
    curves = read_csv(out / "curves.csv")
    assert [(row[0], float(row[1]), float(row[2])) for row in curves[1:]] == [
        ("rebel", 0.0, 0.25), ("rebel", 48.0, 0.625), ("ppo", 0.0, 0.25), ("ppo", 48.0, 0.25)]
    assert "final comparison at reward_queries = 48" in capsys.readouterr().out
    (tmp_path / "runs" / "ppo_1" / "eval.jsonl").unlink()
    assert main([f"ppo={tmp_path}/runs/ppo_*", "--metric", "eval_shape_accuracy", "--out", str(out)]) == 2
    assert "eval.jsonl is missing" in capsys.readouterr().err


def test_the_readme_compare_examples_match_the_run_names_quickstarts_and_the_seed_runner_create(monkeypatch) -> None:
    import fnmatch
    import importlib
    import re

    from rebel_diffusion import trainer

    monkeypatch.setattr(trainer, "broadcast_object_list", lambda objects: objects)  # one process: nothing to agree on
    names = {}
    for algorithm in ("rebel", "ppo", "rloo", "grpo", "online_dpo"):
        config = importlib.import_module(f"configs.quickstart_{algorithm}").get_config()
        names[algorithm] = [str(trainer._run_dir(config, None)), f"runs/seeds/{algorithm}_seed0"]  # scripts/seeds.py's
    examples = [line for line in (REPO / "README.md").read_text().splitlines() if "compare_curves.py" in line
                and "=" in line]
    groups = [group for line in examples for group in re.findall(r"(\w+)='([^']+)'", line)]
    assert len(groups) >= 4, examples
    for name, pattern in groups:
        matched = [run for runs in names.values() for run in runs if fnmatch.fnmatch(run, pattern)]
        assert matched and all(run in names[name] for run in matched), (name, pattern, matched)
