"""benchmarks/bench.py: the per-round ratio arithmetic and target verdicts by hand, a deliberately slowed case, and one
quick round on the tiny models printing every row with a spread that holds its median and a verdict from that spread."""

import sys
import time

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO))  # `benchmarks` is a folder of the repository, not part of the installed package

from benchmarks import bench  # noqa: E402

# One row per measurement the quick mode makes; the SD-1.5-shaped section is skipped there.
EXPECTED = [
    "`LCMPolicy.sample` / bare `LatentConsistencyModelPipeline`",
    "`LCMPolicy.sample` / the pipeline with the same LoRA loaded",
    "`LCMPolicy.sample` / the same with the LoRA unmerged",
    "`LCMPolicy.sample` re-merging (LoRA changed since the last call) / bare",
    "rebel update / floor", "ppo update / floor", "rloo update / floor", "grpo update / floor",
    "online_dpo update / floor", "rebel_preference update / floor",
    "rebel epoch (",
    "rebel epoch, reward scored beside sampling / in sequence",
    "rebel epoch, shape_fidelity served, overlap on / in-process, overlap on",
    "rebel epoch, shape_fidelity served, overlap off / in-process, overlap on",
    "rebel epoch, shape_fidelity in-process, overlap off / in-process, overlap on",
    "`CausalLMPolicy.sample` / `model.generate` on token ids",
    "`CausalLMPolicy.sample` / tokenize + `model.generate` + decode",
    "`FlowMatchPolicy.sample` / bare `StableDiffusion3Pipeline`",
    "`FlowMatchPolicy.sample` / the pipeline with the same LoRA loaded", "rebel update / floor",
    "rebel update peak memory, horizon T=8 / T=2",
]


def test_timings_combine_round_by_round():
    # floor = 2 * pass + decode in each round: [3, 5, 9]; the case's rounds over it: 3/3, 5/5, 18/9 = [1, 1, 2].
    case, passes, decode = bench.Timing([3.0, 5.0, 18.0]), bench.Timing([1.0, 2.0, 4.0]), bench.Timing([1.0, 1.0, 1.0])
    ratio = case / (2 * passes + decode)
    assert isinstance(ratio, bench.Ratio) and ratio.rounds == (1.0, 1.0, 2.0)
    assert float(ratio) == 1.0 and (ratio.low, ratio.high) == (1.0, 2.0)
    # The median of the per-round ratios, not the ratio of the medians (5 / 5 = 1 here too, but 18 / 9 is kept).
    assert float(case) == 5.0 and bench.spread(ratio) == (1.0, 2.0)
    with pytest.raises(ValueError, match="rounds"):
        case + bench.Timing([1.0, 2.0])


@pytest.mark.parametrize("rounds, target, expected", [
    ([0.90, 0.95, 1.00], "<= 1.0", "met"),
    ([0.90, 0.95, 1.00], "< 1", "not met (spread crosses it)"),  # the median is inside, one round is not
    ([0.90, 1.00, 1.20], "<= 1.05", "not met (spread crosses it)"),
    ([1.10, 1.20, 1.30], "<= 1.05", "not met"),
    ([1.10, 1.20, 1.30], "", ""),
    ([0.50], "<= 1.0", "no verdict (one round)"),  # one timed round has no spread to judge
])
def test_a_target_is_met_only_by_the_whole_spread(rounds, target, expected):
    assert bench.verdict(bench.Ratio(rounds), target) == expected


def test_a_deliberately_slowed_case_is_reported_over_target():
    # The slow case sleeps 20 ms more than the fast one in every round: each per-round ratio is far above 1.
    times = bench.medians({"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.021)}, 3, torch.device("cpu"))
    ratio = times["slow"] / times["fast"]
    assert len(ratio.rounds) == 3 and ratio.low > 1.5
    line = bench.format_row("m", "slow / fast", ratio, "", "<= 1.0")
    cells = [cell.strip() for cell in line.strip("|").split(" | ")]
    assert cells[-1] == "not met" and cells[3].endswith("(3 rounds)")
    assert bench.verdict(times["fast"] / times["slow"], "<= 1.0") == "met"


def parse_spread(cell: str, ratio: float) -> tuple[float, float]:
    if cell in ("one measurement", "one round"):
        return ratio, ratio
    low, _, high = cell.split(" (")[0].partition(" to ")
    return float(low), float(high)


def test_quick_bench_prints_every_row_with_its_spread_and_verdict(capsys, tmp_path):
    out = tmp_path / "table.md"
    table = bench.main(["--quick", "--out", str(out)])
    assert table in capsys.readouterr().out  # the rows came out contiguous, nothing printed between them
    assert out.read_text() == table + "\n"
    lines = table.splitlines()
    assert lines[0] == "| model | measurement | ratio | spread | medians | target | verdict |"
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]
    assert len(rows) == len(EXPECTED)
    for row, what in zip(rows, EXPECTED):
        assert len(row) == 7, row
        model, measurement, ratio, extent, _, target, said = row
        assert what in measurement, (what, measurement)
        ratio = float(ratio)
        low, high = parse_spread(extent, ratio)
        assert 0 < low <= ratio <= high, row  # the median lies inside its spread (both rounded to 3 decimals)
        # The verdict follows from the printed spread: both ends inside a one-sided target, or not met.
        if extent == "one round":  # the quick mode times one round: no timing target is judged on it
            assert said == ("no verdict (one round)" if target else ""), row
        elif target:
            operator, bound = target.split()
            inside = {"<=": lambda x: x <= float(bound), "<": lambda x: x < float(bound)}[operator]
            if float(bound) in (low, high):
                pass  # an end printed as the bound itself: its unrounded value decides, and it is not printed
            elif inside(low) and inside(high):
                assert said == "met", row
            else:
                assert said.startswith("not met"), row
        else:
            assert said == "", row
    assert [row[5] for row in rows if row[5]] == ["<= 1.0", "<= 1.0", "<= 1.0", "<= 1.05", "< 1", "<= 1.05", "<= 1.05",
                                                  "<= 1.0", "<= 1.0", "<= 1.05", "<= 1.2"]
    # Timings of one round; the memory row is an exact count, judged as it is.
    assert [row[3] for row in rows] == ["one round"] * (len(EXPECTED) - 1) + ["one measurement"]
    assert rows[-1][6] == ("met" if float(rows[-1][2]) <= 1.2 else "not met")
