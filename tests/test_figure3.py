"""scripts/figure3.py: every algorithm is tuned over the same kind of space, and a final run is redone when the best
config it trained is no longer the sweep's best."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import figure3  # noqa: E402

from rebel_diffusion.algorithms import ALGORITHMS  # noqa: E402
from rebel_diffusion.sweep import check_space, parse_space  # noqa: E402


def steps_per_epoch(config, batch_size: int) -> int:
    groups = config.sample.batch_size * config.sample.num_batches_per_epoch
    return groups // (batch_size * config.train.gradient_accumulation_steps) * config.train.num_inner_epochs


@pytest.mark.parametrize("name", sorted(figure3.TASKS))
def test_every_algorithm_is_tuned_over_the_same_kind_of_space(name):
    task = figure3.TASKS[name]
    learning_rates, geometries = set(), set()
    for algorithm in figure3.ALGORITHMS:
        config = figure3._base_config(task, algorithm)
        space = parse_space(task.spaces[algorithm])
        check_space(space, config)  # every key exists in the algorithm's config, with a value of its type
        keys = [p.key for p in space]
        assert keys[:2] == ["train.learning_rate", "train.batch_size"] and len(keys) == 3
        # The third key is the algorithm's own: a key of its config section.
        assert keys[2].split(".")[0] in {"rebel", "ppo", "rloo", "grpo", "dpo"}
        learning_rates.add((space[0].kind, space[0].low, space[0].high))
        # The batch geometry is optimizer steps per epoch at the config's reward queries, the same set for all.
        geometries.add(frozenset(steps_per_epoch(config, int(b)) for b in space[1].choices))
        assert steps_per_epoch(config, config.train.batch_size) in next(iter(geometries))
        assert ALGORITHMS[config.algorithm].name == algorithm
    assert len(learning_rates) == 1 and len(geometries) == 1


def finished_run(run_dir: Path, num_epochs: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(num_epochs)))
    (run_dir / "eval.jsonl").write_text(json.dumps({"epoch": 0}) + "\n" + json.dumps({"epoch": num_epochs}) + "\n")


def test_a_final_run_is_kept_only_while_it_trained_the_sweeps_best_config(tmp_path, monkeypatch):
    task = figure3.TASKS["image"]
    calls = []

    def fake_train_run(config, seed, run_dir, extra):
        calls.append((Path(config).name, seed))
        run_dir.mkdir(parents=True, exist_ok=True)
        return 0

    monkeypatch.setattr(figure3, "train_run", fake_train_run)
    best = tmp_path / "sweep" / "rebel" / "best_config.py"
    best.parent.mkdir(parents=True)
    best.write_text("# trial 3\n")
    finished_run(tmp_path / "final" / "rebel_seed100", 16)
    figure3.final_runs(task, ["rebel"], range(100, 102), 1, tmp_path)
    # No marker: the finished seed-100 run may be of another config, so both seeds train.
    assert calls == [("best_config.py", 100), ("best_config.py", 101)]
    calls.clear()
    for seed in (100, 101):  # the fake training wrote no metrics: finish both runs by hand
        finished_run(tmp_path / "final" / f"rebel_seed{seed}", 16)
    figure3.final_runs(task, ["rebel"], range(100, 102), 1, tmp_path)
    assert calls == []  # finished, and of the current best config
    best.write_text("# trial 5\n")
    figure3.final_runs(task, ["rebel"], range(100, 102), 1, tmp_path)
    assert calls == [("best_config.py", 100), ("best_config.py", 101)]


def test_the_final_runs_evaluate_on_the_held_out_prompts_not_the_tuning_ones():
    for name, task in figure3.TASKS.items():
        overrides = dict(o.removeprefix("--config.").split("=", 1) for o in figure3.final_overrides(task, "rebel"))
        base = figure3._base_config(task, "rebel")
        assert overrides["eval.prompt_file"] == base.eval.prompt_file != ""
        tuning = dict(o.removeprefix("--config.").split("=", 1) for o in task.validation)
        assert tuning["eval.prompt_file"] != base.eval.prompt_file, name


def test_the_text_tuning_prompts_are_training_prompts_and_none_is_held_out(tmp_path):
    base = figure3._base_config(figure3.TASKS["text"], "rebel")
    validation = figure3._validation_prompts(tmp_path, base).read_text().split()
    held_out = set((REPO / base.eval.prompt_file).read_text().split())
    assert len(validation) == 200 and set(validation) <= set((REPO / base.prompt_file).read_text().split())
    assert not set(validation) & held_out


def test_tuned_values_are_read_from_best_config(tmp_path):
    (tmp_path / "best_config.py").write_text('"""The best trial of sweep \'x\': trial 2, IQM of eval_r 0.5 over 1 seeds."""\n'
                                             "def get_config():\n    config.train.learning_rate = 0.0012345\n"
                                             "    config.train.batch_size = 64\n    config.rebel.eta = 2.0\n")
    space = "train.learning_rate=loguniform(1e-3,3e-2);train.batch_size=64,128;rebel.eta=loguniform(0.3,3)"
    assert figure3.tuned_values(tmp_path, space) == "learning_rate 0.00123, batch_size 64, eta 2"
