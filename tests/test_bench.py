"""Smoke test of benchmarks/bench.py: one quick round on the tiny models prints every row, each a finite ratio."""

import math
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repository, not part of the installed package

from benchmarks import bench  # noqa: E402

# One row per measurement the quick mode makes; the SD-1.5-shaped section is skipped there.
EXPECTED = [
    "`LCMPolicy.sample` / bare `LatentConsistencyModelPipeline`",
    "`LCMPolicy.sample` / the pipeline with the same LoRA loaded",
    "rebel update / floor", "ppo update / floor", "rloo update / floor", "grpo update / floor",
    "online_dpo update / floor",
    "rebel epoch (",
    "rebel epoch, reward scored beside sampling / in sequence",
    "`CausalLMPolicy.sample` / `model.generate`",
    "rebel update peak memory, horizon T=8 / T=2",
]


def test_quick_bench_prints_every_row_as_a_finite_ratio(capsys, tmp_path):
    out = tmp_path / "table.md"
    table = bench.main(["--quick", "--out", str(out)])
    assert table in capsys.readouterr().out  # the rows came out contiguous, nothing printed between them
    assert out.read_text() == table + "\n"
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) == len(EXPECTED)
    for row, what in zip(rows, EXPECTED):
        assert what in row[1], (what, row[1])
        ratio = float(row[2])
        assert math.isfinite(ratio) and ratio > 0, row
