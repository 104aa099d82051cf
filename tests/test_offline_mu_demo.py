"""scripts/offline_mu_demo.py: the offline data it writes."""

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
