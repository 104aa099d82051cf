"""The command line: bad input is one clear line and a non-zero exit, before any model is loaded."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_all(cases: dict[str, list[str]], tmp_path: Path) -> dict[str, subprocess.CompletedProcess]:
    """Start every case at once (each is mostly interpreter start-up), then collect them."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "train.py", "--config", "configs/base.py", f"--config.logdir={tmp_path / 'runs'}", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, args in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


# Each case is a fresh interpreter (about 4 s of imports): the fast suite runs one of each kind of check, the slow suite
# the rest; validate_config's own tests check every message in-process.
BAD_INPUTS = {
    "unknown key": (["--config.train.learning_rat=1e-4"], "unknown config key 'learning_rat' in --config.train"),
    "bad value": (["--config.num_epochs=ten"], "--config.num_epochs=ten"),
    "missing config file": (["--config=configs/nope.py"], "cannot load the --config file"),
    "unknown algorithm": (["--config.algorithm=dpo"], "unknown algorithm 'dpo'"),
    "unknown reward": (["--config.reward.name=beauty"], "unknown reward 'beauty'"),
    "missing prompt file": (["--config.prompt_file=missing.txt"], "prompt_file 'missing.txt' does not exist"),
    "empty prompt file": (["--config.prompt_file=EMPTY"], "holds no prompts"),
    "missing model": (["--config.model.pretrained=./models/none"], "model.pretrained './models/none' is neither"),
    "group of one": (["--config.algorithm=grpo", "--config.grpo.k=1"], "grpo.k must be an integer of at least 2"),
    "image reward on text": (["--config.policy=causal_lm", "--config.model.pretrained=assets/tiny-lm",
                              "--config.reward.name=shape_fidelity"],
                             "reward 'shape_fidelity' scores image outputs, but policy 'causal_lm' produces text"),
    "key of another policy": (["--config.model.max_new_tokens=10"],
                              "model.max_new_tokens does not apply to policy 'lcm' (only to causal_lm)"),
    "advantage of one reward": (["--config.reward.aggregate=advantage"],
                                "reward.aggregate='advantage' needs a weighted reward of at least two components"),
}
FAST = ("unknown key", "bad value", "unknown algorithm", "key of another policy")


def check_bad_inputs(names: list[str], tmp_path: Path) -> None:
    """Each named case exits 2 with one `error:` line holding its message, before anything is started."""
    (tmp_path / "empty.txt").write_text("\n")
    args = {name: [a.replace("EMPTY", str(tmp_path / "empty.txt")) for a in BAD_INPUTS[name][0]] for name in names}
    results = run_all(args, tmp_path)
    for name in names:
        message, result = BAD_INPUTS[name][1], results[name]
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_bad_input_gives_one_line_and_a_non_zero_exit(tmp_path):
    check_bad_inputs(list(FAST), tmp_path)


@pytest.mark.slow
def test_every_bad_input_gives_one_line_and_a_non_zero_exit(tmp_path):
    check_bad_inputs([name for name in BAD_INPUTS if name not in FAST], tmp_path)
