"""reward.aggregate: "advantage" normalises each component with the algorithm's own rule before the weights apply."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from safetensors.torch import load_file

from configs import quickstart_rebel
from configs.base import get_config
from rebel_diffusion.algorithms import ALGORITHMS
from rebel_diffusion.algorithms.aggregate import ComponentStatTrackers, advantage_targets, check_aggregate
from rebel_diffusion.checkpoints import check_resumable
from rebel_diffusion.errors import ConfigError
import rebel_diffusion.trainer as trainer
from rebel_diffusion.trainer import train
from rebel_diffusion.trajectory import Trajectory

from processes import launch_two_processes, write_script

REPO = Path(__file__).resolve().parents[1]


def zscores(values: list[float], eps: float) -> list[float]:
    """`(v - mean) / (std + eps)`, std with ddof 0, in plain Python."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + eps) for v in values]


def config_for(algorithm: str, overrides: dict | None = None) -> ConfigDict:
    """The base config with a two-component reward aggregated by advantage, and dotted `overrides`."""
    config = get_config()
    config.algorithm = algorithm
    config.reward.name = "small:2.0,big:1.0"
    config.reward.aggregate = "advantage"
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


# Two components on scales 1 and 1000 that rank the samples of each group in opposite orders.
SMALL = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.4]])
BIG = np.array([[100.0, 900.0, 400.0], [700.0, 300.0, 600.0]])
WEIGHTS = {"small": 2.0, "big": 1.0}


def test_grpo_advantage_weighs_components_by_their_weights_where_the_sum_follows_the_big_one():
    config = config_for("grpo", {"grpo.k": 3})
    grpo, eps = ALGORITHMS["grpo"], config.grpo.eps
    trackers = ComponentStatTrackers(list(WEIGHTS), 32, 16)
    targets, shares = advantage_targets(grpo, {"small": SMALL, "big": BIG}, WEIGHTS, ["p", "q"], trackers, config)

    small = [zscores(row, eps) for row in SMALL.tolist()]
    big = [zscores(row, eps) for row in BIG.tolist()]
    expected = [[2.0 * s + b for s, b in zip(srow, brow)] for srow, brow in zip(small, big)]
    np.testing.assert_allclose(targets, expected, rtol=1e-12)
    # The weighted sum's targets take the big component's signs; the advantage's the weight-2 small one's.
    summed = grpo.targets(2.0 * SMALL + BIG, ["p", "q"], None, config)
    assert (np.sign(summed[:, :2]) == np.sign(np.array(big)[:, :2])).all()
    assert (np.sign(targets[:, :2]) == np.sign(np.array(small)[:, :2])).all()

    small_size = sum(abs(2.0 * v) for row in small for v in row) / 6
    big_size = sum(abs(v) for row in big for v in row) / 6
    assert shares == pytest.approx({"small": small_size / (small_size + big_size),
                                    "big": big_size / (small_size + big_size)}, rel=1e-12)


# Two epochs of prompts p, p, q, q (min_count 2: each prompt's own history from the first epoch on).
EPOCHS = [
    {"small": [1.0, 3.0, 0.0, 2.0], "big": [1000.0, 0.0, 500.0, 100.0]},
    {"small": [2.0, 2.0, 4.0, 0.0], "big": [200.0, 800.0, 0.0, 300.0]},
]


def tracked_by_hand(name: str, epoch: int) -> list[float]:
    """The tracker's z-score of each of `name`'s scores against its prompt's history of `name` alone."""
    history = {"p": [], "q": []}
    for seen in EPOCHS[: epoch + 1]:
        history["p"] += seen[name][:2]
        history["q"] += seen[name][2:]
    out = []
    for i, value in enumerate(EPOCHS[epoch][name]):
        past = history["p" if i < 2 else "q"]
        mean = sum(past) / len(past)
        std = math.sqrt(sum((v - mean) ** 2 for v in past) / len(past))
        out.append((value - mean) / (std + 1e-6))
    return out


@pytest.mark.parametrize("algorithm, shape, prompts", [("ppo", (4, 1), ["p", "p", "q", "q"]),
                                                       ("rebel", (2, 2), ["p", "q"])])
def test_tracker_algorithms_normalise_each_component_against_its_own_history(algorithm, shape, prompts):
    config = config_for(algorithm)
    trackers = ComponentStatTrackers(list(WEIGHTS), buffer_size=8, min_count=2)
    for epoch, scores in enumerate(EPOCHS):
        components = {name: np.array(values).reshape(shape) for name, values in scores.items()}
        targets, _ = advantage_targets(ALGORITHMS[algorithm], components, WEIGHTS, prompts, trackers, config)
        expected = [2.0 * s + b for s, b in zip(tracked_by_hand("small", epoch), tracked_by_hand("big", epoch))]
        np.testing.assert_allclose(targets.reshape(-1), expected, rtol=1e-9)


def test_rebel_batch_zscore_normalises_each_component_over_the_batch():
    config = config_for("rebel", {"rebel.target": "batch_zscore"})
    components = {name: np.array(values).reshape(2, 2) for name, values in EPOCHS[0].items()}
    trackers = ComponentStatTrackers(list(WEIGHTS), 32, 16)
    targets, _ = advantage_targets(ALGORITHMS["rebel"], components, WEIGHTS, ["p", "q"], trackers, config)
    expected = [2.0 * s + b for s, b in zip(zscores(EPOCHS[0]["small"], 1e-6), zscores(EPOCHS[0]["big"], 1e-6))]
    np.testing.assert_allclose(targets.reshape(-1), expected, rtol=1e-9)


@pytest.mark.parametrize("algorithm, overrides, message", [
    ("rebel", {"reward.aggregate": "mean"}, "reward.aggregate must be one of ['sum', 'advantage'], got 'mean'"),
    ("rebel", {"reward.name": "big:2.0"}, "reward.aggregate='advantage' needs a weighted reward of at least two"),
    ("rloo", {}, "reward.aggregate='advantage' would equal 'sum' for algorithm 'rloo'"),
    ("online_dpo", {}, "would equal 'sum' for algorithm 'online_dpo'"),
    ("rebel", {"rebel.target": "rewards"}, "would equal 'sum' for algorithm 'rebel'"),
    ("rebel", {"kl_coef": 0.1}, "reward.aggregate='advantage' with kl_coef > 0 is refused for algorithm 'rebel'"),
    ("grpo", {"reward.missing_eos_penalty": -1.0}, "reward.missing_eos_penalty replaces the total reward"),
])
def test_advantage_is_refused_where_it_cannot_apply(algorithm, overrides, message):
    config = config_for(algorithm, overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_aggregate(config, ALGORITHMS[algorithm], len(config.reward.name.split(",")))


def test_a_kl_loss_term_combines_with_advantage():
    for algorithm in ("ppo", "grpo"):
        config = config_for(algorithm, {"kl_coef": 0.1})
        check_aggregate(config, ALGORITHMS[algorithm], 2)


def test_a_checkpoint_from_before_the_key_resumes_as_sum_only(tmp_path):
    old = get_config().to_dict()
    del old["reward"]["aggregate"]
    old["reward"]["name"] = "small:2.0,big:1.0"
    (tmp_path / "training_config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"epoch": 1, "reward_queries": 4, "optimizer_steps": 2}))
    new = config_for("rebel")
    new.reward.aggregate = "sum"
    assert check_resumable(new, tmp_path) == []
    new.reward.aggregate = "advantage"
    with pytest.raises(ConfigError, match="reward.aggregate: 'sum' -> 'advantage'"):
        check_resumable(new, tmp_path)


def quickstart_advantage(logdir: Path, num_epochs: int, **keys) -> ConfigDict:
    config = quickstart_rebel.get_config()
    config.reward.name = "large_shape:1,shape_fidelity:1"
    config.reward.aggregate = "advantage"
    config.model.pretrained = str(REPO / "assets" / "tiny-lcm")
    (logdir / "prompts.txt").write_text("a red circle on a white background\na blue triangle on a gray background\n")
    config.prompt_file = str(logdir / "prompts.txt")
    config.logdir, config.run_name, config.log_with = str(logdir), "run", ""
    config.num_epochs, config.save_freq = num_epochs, 1
    config.sample.batch_size, config.sample.num_batches_per_epoch, config.train.batch_size = 2, 2, 2
    config.stat_tracker.min_count = 2  # targets from each prompt's history: the resume must restore every tracker
    config.grid.num_prompts, config.eval.prompt_file = 0, ""
    for key, value in keys.items():
        setattr(config, key, value)
    return config


def test_a_quickstart_with_advantage_logs_shares_and_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    # Each component's rows must be the samples' rows: the weights 1 and 1 add them up to each sample's reward.
    epochs, cat, aggregate = [], Trajectory.cat, trainer.advantage_targets

    def record_samples(batches):
        samples = cat(batches)
        epochs.append({"rewards": samples.rewards})
        return samples

    def record_components(algorithm, components, *args):
        epochs[-1]["components"] = components
        return aggregate(algorithm, components, *args)

    monkeypatch.setattr(Trajectory, "cat", staticmethod(record_samples))
    monkeypatch.setattr(trainer, "advantage_targets", record_components)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = train(quickstart_advantage(tmp_path / "a", 2))
    assert len(epochs) == 2
    for epoch in epochs:
        total = epoch["components"]["large_shape"] + epoch["components"]["shape_fidelity"]
        np.testing.assert_allclose(total.reshape(-1), epoch["rewards"].numpy(), rtol=1e-6)
    first = train(quickstart_advantage(tmp_path / "b", 1))
    resumed = train(quickstart_advantage(tmp_path / "b", 2, resume_from=str(first)))

    def strip(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    metrics = strip(straight)
    assert strip(resumed) == metrics
    for m in metrics:
        shares = [m["advantage_share_large_shape"], m["advantage_share_shape_fidelity"]]
        assert all(0 < s < 1 for s in shares) and sum(shares) == pytest.approx(1.0)
        assert "reward_large_shape_mean" in m and "reward_shape_fidelity_mean" in m
    saved = json.loads((straight / "checkpoints" / "epoch_0002" / "stat_tracker.json").read_text())
    assert list(saved["components"]) == ["large_shape", "shape_fidelity"]
    assert sum(len(b) for b in saved["components"]["shape_fidelity"]["buffers"].values()) == 2 * 8  # 8 a epoch
    a = load_file(straight / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_gather_each_component_in_the_rewards_order(tiny_lcm_path, tmp_path):
    # Rank r's samples are rows r * n ... of the gathered rewards; each gathered component must hold the same rows.
    (tmp_path / "two_rewards.py").write_text(
        "def bright(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n"
        "def red(images, prompts):\n    return 1000 * images[:, 0].mean(dim=(1, 2))\n")
    script = write_script(tmp_path / "two_ranks.py", f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import rebel_diffusion.trainer as trainer
        from rebel_diffusion.trajectory import Trajectory
        from test_trainer import tiny_config

        cat, aggregate, seen = Trajectory.cat, trainer.advantage_targets, {{}}
        def record_samples(batches):
            samples = cat(batches)
            seen["rewards"] = samples.rewards
            return samples
        def record_components(algorithm, components, *args):
            seen["components"] = components
            return aggregate(algorithm, components, *args)
        Trajectory.cat, trainer.advantage_targets = staticmethod(record_samples), record_components
        run = trainer.train(tiny_config({str(tiny_lcm_path)!r}, {str(tmp_path)!r}, num_epochs=1, algorithm="grpo",
                                        **{{"grpo.k": 2, "reward.name": "two_rewards:bright,two_rewards:red",
                                            "reward.aggregate": "advantage"}}))
        torch.save(seen, run / f"seen{{trainer.PartialState().process_index}}.pt")
    """)
    launch_two_processes(script)
    seen = [torch.load(tmp_path / "run" / f"seen{rank}.pt", weights_only=False) for rank in (0, 1)]
    gathered = torch.cat([s["rewards"] for s in seen]).numpy()
    for s in seen:
        total = s["components"]["two_rewards:bright"] + s["components"]["two_rewards:red"]
        np.testing.assert_allclose(total.reshape(-1), gathered, rtol=1e-6)
