"""scripts/seeds.py's summary: the training-reward gain and held-out changes over seeds, with 95% t-intervals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import seeds  # noqa: E402


def write_run(folder: Path, rewards: list[float], before: float, after: float) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i, "reward_mean": r}) + "\n"
                                                  for i, r in enumerate(rewards)))
    (folder / "eval.jsonl").write_text(json.dumps({"epoch": 0, "eval_large_shape": before}) + "\n"
                                       + json.dumps({"epoch": len(rewards), "eval_large_shape": after}) + "\n")


def test_gains_are_means_with_student_t_intervals(tmp_path):
    # Gains (last 3 epochs minus the first): 0.3, 0.1, 0.2 -> mean 0.2, sample std 0.1; t_{0.975, 2} = 4.302653.
    write_run(tmp_path / "rebel_seed0", [0.5, 0.6, 0.7, 0.8, 0.9], 0.6, 0.7)
    write_run(tmp_path / "rebel_seed1", [0.5, 0.5, 0.5, 0.6, 0.7], 0.6, 0.6)
    write_run(tmp_path / "rebel_seed2", [0.4, 0.9, 0.5, 0.6, 0.7], 0.6, 0.8)
    table = seeds.gains_table(tmp_path, ["rebel"], range(3))
    header, _, row = table.splitlines()
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    half = 4.302653 * 0.1 / 3**0.5
    assert cells[:4] == ["rebel", "3", "0.467", "0.667"]
    assert cells[4] == f"+0.200 [{0.2 - half:+.3f}, {0.2 + half:+.3f}]"
    assert cells[5] == "3/3"
    # Held-out changes 0.1, 0.0, 0.2: the same mean and interval.
    assert "held-out large_shape: before" in header
    assert cells[6:9] == ["0.600", "0.700", f"+0.100 [{0.1 - half:+.3f}, {0.1 + half:+.3f}]"]


def test_mean_ci_of_one_run_has_no_interval():
    mean, low, high = seeds.mean_ci(seeds.np.asarray([0.25]))
    assert mean == 0.25 and low != low and high != high  # NaN


def test_the_held_out_summary_is_before_after_and_change_with_student_t_intervals(tmp_path):
    # After: 0.7, 0.8, 0.9 (mean 0.8, sample std 0.1); changes 0.2, 0.3, 0.4 (mean 0.3, std 0.1); t_{0.975, 2} = 4.302653.
    for seed, after in enumerate([0.7, 0.8, 0.9]):
        run = tmp_path / f"offline_seed{seed}"
        run.mkdir()
        run.joinpath("eval.jsonl").write_text(json.dumps({"epoch": 0, "eval_addition_exact": 0.5}) + "\n"
                                              + json.dumps({"epoch": 30, "eval_addition_exact": after}) + "\n")
    row = seeds.held_out_table(tmp_path, ["offline"], range(3), "eval_addition_exact", "rebel.mu").splitlines()[2]
    half = 4.302653 * 0.1 / 3**0.5
    assert row == (f"| offline | 3 | 0.500 | 0.800 [{0.8 - half:.3f}, {0.8 + half:.3f}] | "
                   f"+0.300 [{0.3 - half:+.3f}, {0.3 + half:+.3f}] |")
