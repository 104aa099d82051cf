"""scripts/offline_mu_demo.py: the offline data it writes and its held-out summary with 95% t-intervals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import offline_mu_demo  # noqa: E402


def test_the_offline_data_is_the_right_sum_of_every_training_prompt(tmp_path):
    offline_mu_demo.write_sums(tmp_path / "sums.jsonl")
    records = [json.loads(line) for line in (tmp_path / "sums.jsonl").read_text().splitlines()]
    assert len(records) == 8000 and records[0] == {"prompt": "89+22=", "response": "111"}  # the file's first line


def test_the_summary_is_before_after_and_change_with_student_t_intervals(tmp_path):
    # After: 0.7, 0.8, 0.9 (mean 0.8, sample std 0.1); changes 0.2, 0.3, 0.4 (mean 0.3, std 0.1); t_{0.975, 2} = 4.302653.
    for seed, after in enumerate([0.7, 0.8, 0.9]):
        run = tmp_path / f"offline_seed{seed}"
        run.mkdir()
        run.joinpath("eval.jsonl").write_text(json.dumps({"epoch": 0, "eval_addition_exact": 0.5}) + "\n"
                                              + json.dumps({"epoch": 30, "eval_addition_exact": after}) + "\n")
    row = offline_mu_demo.compare_table(tmp_path, ["offline"], range(3)).splitlines()[2]
    half = 4.302653 * 0.1 / 3**0.5
    assert row == (f"| offline | 3 | 0.500 | 0.800 [{0.8 - half:.3f}, {0.8 + half:.3f}] | "
                   f"+0.300 [{0.3 - half:+.3f}, {0.3 + half:+.3f}] |")
