import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline
from safetensors.torch import load_file

import rebel_diffusion.trainer as trainer
from configs.base import get_config
from rebel_diffusion.algorithms import ALGORITHMS
from rebel_diffusion.trainer import ConfigError, NonFiniteError, train, validate_config

from processes import launch_two_processes, write_script, write_weights_dump_script

REPO = Path(__file__).resolve().parents[1]


def override(config, overrides: dict):
    """Set dotted keys ("train.batch_size") of a config."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def tiny_config(model: Path, logdir: Path, **overrides):
    config = get_config()
    config.model.pretrained = str(model)
    config.resolution = 32
    config.logdir = str(logdir)
    config.run_name = "run"
    config.log_with = ""
    config.num_epochs = 2
    config.save_freq = 1
    config.sample.batch_size = 2
    config.sample.num_batches_per_epoch = 2
    config.train.batch_size = 1
    config.train.gradient_accumulation_steps = 2
    config.stat_tracker.min_count = 2
    config.grid.num_prompts = 2
    config.grid.num_seeds = 2
    return override(config, overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rebel_run_writes_metrics_checkpoints_and_loadable_lora(tiny_lcm_path, tmp_path):
    config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=3, num_checkpoint_limit=2, log_with="tensorboard")
    run_dir = train(config)
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    for key in ("epoch", "reward_mean", "reward_std", "reward_queries", "loss", "lr", "seconds", "grad_norm"):
        assert all(key in m for m in metrics), key
    # REBEL spends two reward queries per prompt: 2 batches x 2 prompts x 2 samples per epoch.
    assert [m["reward_queries"] for m in metrics] == [8, 16, 24]
    assert metrics[-1]["optimizer_steps"] == 3 * 4 // 2
    assert json.loads((run_dir / "config.json").read_text())["algorithm"] == "rebel"
    assert list(run_dir.glob("events.out.tfevents.*")), "TensorBoard tracker wrote nothing"
    for png in ("grid_first.png", "grid_last.png", "learning_curve.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0002", "epoch_0003"]  # the limit pruned epoch_0001; no temporary folder left
    last = run_dir / "checkpoints" / "epoch_0003"
    card = (last / "README.md").read_text()
    assert card.startswith("---") and "load_lora_weights" in card and "rebel" in card
    lora = load_file(last / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora.up" in k or "lora_B" in k), "LoRA did not train"
    pipeline = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_path)
    pipeline.load_lora_weights(last)
    assert any("lora" in n for n, _ in pipeline.unet.named_parameters())


def test_ppo_run_logs_its_diagnostics(tiny_lcm_path, tmp_path):
    config = tiny_config(tiny_lcm_path, tmp_path, algorithm="ppo", num_epochs=1, **{"train.num_inner_epochs": 2})
    metrics = read_metrics(train(config))
    assert metrics[0]["reward_queries"] == 4  # one query per prompt
    assert metrics[0]["optimizer_steps"] == 2 * 4 // 2  # 2 inner epochs x 4 micro-batches / 2 accumulated
    assert 0.0 <= metrics[0]["clipfrac"] <= 1.0 and metrics[0]["approx_kl"] >= 0.0


def test_resume_reproduces_an_uninterrupted_run(tiny_lcm_path, tmp_path):
    straight = train(tiny_config(tiny_lcm_path, tmp_path / "a", num_epochs=4, save_freq=2))
    first = train(tiny_config(tiny_lcm_path, tmp_path / "b", num_epochs=2, save_freq=2))
    resumed = train(tiny_config(tiny_lcm_path, tmp_path / "c", num_epochs=4, save_freq=2, run_name="",
                                resume_from=str(first)))
    assert resumed == first  # a resumed run without a run_name continues in its own folder

    def strip(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert strip(read_metrics(resumed)) == strip(read_metrics(straight))
    a = load_file(straight / "checkpoints" / "epoch_0004" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "checkpoints" / "epoch_0004" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_into_another_run_folder_that_holds_a_run_is_refused(tmp_path):
    first = train(text_config(tmp_path, num_epochs=1, run_name="a"))
    other = train(text_config(tmp_path, num_epochs=1, run_name="b"))
    before = (other / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(text_config(tmp_path, num_epochs=2, run_name="b", resume_from=str(first)))
    assert (other / "metrics.jsonl").read_text() == before


def test_non_finite_reward_stops_the_run_naming_epoch_and_prompt(tiny_lcm_path, tmp_path, monkeypatch):
    (tmp_path / "nan_reward.py").write_text(textwrap.dedent("""
        import torch
        calls = 0
        def reward(images, prompts):
            global calls
            calls += 1
            rewards = torch.ones(len(prompts))
            if calls > 2:  # epoch 0 has two sampling batches; the first batch of epoch 1 goes wrong
                rewards[1] = float("nan")
            return rewards
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=3, prompt_file=str(tmp_path / "prompts.txt"),
                         **{"reward.name": "nan_reward:reward"})
    with pytest.raises(NonFiniteError, match=r"epoch 1: reward nan for prompt 'a cat'.*epoch_0001"):
        train(config)
    assert (tmp_path / "run" / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").exists()
    assert [m["epoch"] for m in read_metrics(tmp_path / "run")] == [0]


def test_held_out_eval_weighted_reward_components_and_kl_are_logged(tiny_lcm_path, tmp_path, monkeypatch):
    (tmp_path / "two_rewards.py").write_text(
        "def bright(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n"
        "def red(images, prompts):\n    return images[:, 0].mean(dim=(1, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "heldout.txt").write_text("a green cross\na purple circle\n")
    config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=3, algorithm="rloo", kl_coef=0.5, log_with="tensorboard", **{
        "rloo.k": 2, "reward.name": "two_rewards:bright:1.0,two_rewards:red:0.5",
        "eval.prompt_file": str(tmp_path / "heldout.txt"), "eval.every": 2, "eval.num_seeds": 2,
        "eval.rewards": "two_rewards:red"})
    run_dir = train(config)
    metrics = read_metrics(run_dir)
    for m in metrics:
        assert m["reward_mean"] == pytest.approx(m["reward_two_rewards:bright_mean"] + 0.5 * m["reward_two_rewards:red_mean"],
                                                 rel=1e-5)
        # With the KL in the reward, `kl` is the mean sampled log-ratio (k1): unbiased, and it can come out below 0.
        assert math.isfinite(m["kl"])
        assert m["reward_shaped_mean"] == pytest.approx(m["reward_mean"] - 0.5 * m["kl"], rel=1e-4, abs=1e-6)
    assert metrics[0]["reward_queries"] == 2 * 2 * 2  # rloo.k = 2 samples per prompt
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 2, 3]  # before training, every 2 epochs, after the last
    assert all(0 <= e["eval_two_rewards:red"] <= 1 for e in evals)
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["epoch_0000.png", "epoch_0002.png", "epoch_0003.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("eval")] == [0, 2, 3]
    assert [e.step for e in events.Scalars("eval_two_rewards:red")] == [0, 2, 3]


def test_a_failing_reward_stops_the_run_naming_reward_epoch_and_prompt(tiny_lcm_path, tmp_path, monkeypatch):
    (tmp_path / "flaky_reward.py").write_text(
        "calls = 0\ndef reward(images, prompts):\n    global calls\n    calls += 1\n"
        "    if calls > 2:\n        raise ConnectionError('reward server went away')\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=3, prompt_file=str(tmp_path / "prompts.txt"),
                         **{"reward.name": "flaky_reward:reward"})
    with pytest.raises(trainer.RewardError, match=r"epoch 1: reward 'flaky_reward:reward' failed on the batch whose "
                                                  r"first prompt is 'a cat': reward server went away.*epoch_0001"):
        train(config)
    assert (tmp_path / "run" / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").exists()


def test_non_finite_gradient_stops_before_the_update(tiny_lcm_path, tmp_path, monkeypatch):
    rebel = ALGORITHMS["rebel"]
    monkeypatch.setitem(ALGORITHMS, "rebel", dataclasses.replace(rebel, pair_loss=lambda *a: rebel.pair_loss(*a) * float("nan")))
    with pytest.raises(NonFiniteError, match=r"epoch 0: gradient norm nan; stopped before the update, no checkpoint was written yet"):
        train(tiny_config(tiny_lcm_path, tmp_path))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"algorithm": "dpo"}, "unknown algorithm 'dpo'"),
        ({"reward.name": "beauty"}, "unknown reward 'beauty'"),
        ({"reward.name": "no_such_module:fn"}, "cannot import module 'no_such_module'"),
        ({"prompt_file": "/nonexistent/prompts.txt"}, "does not exist"),
        ({"model.pretrained": "./no/such/model"}, "neither an existing folder"),
        ({"train.gradient_accumulation_steps": 3}, "must be a multiple of"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"num_checkpoint_limit": 0}, "num_checkpoint_limit must be at least 1"),
        ({"resume_from": "/nonexistent/run"}, "resume_from"),
        ({"algorithm": "rloo", "rloo.k": 1}, "rloo.k must be an integer of at least 2"),
        ({"algorithm": "grpo", "grpo.k": 0}, "grpo.k must be an integer of at least 2"),
        ({"kl_coef": -0.1}, "kl_coef must be non-negative"),
        ({"algorithm": "online_dpo", "dpo.beta": -1.0}, "dpo.beta must be positive"),
        ({"rebel.eta": 0.0}, "rebel.eta must be positive"),
        ({"sample.batch_size": 3, "sample.num_batches_per_epoch": 1, "train.batch_size": 2,
          "train.gradient_accumulation_steps": 1}, r"must be a multiple of train.batch_size \* train"),
        ({"reward.name": "addition_exact"}, "reward 'addition_exact' scores text outputs, but policy 'lcm' produces image"),
        ({"policy": "diffusion"}, "unknown policy 'diffusion'"),
        ({"eval.prompt_file": "/nonexistent/eval.txt"}, "eval.prompt_file '/nonexistent/eval.txt' does not exist"),
    ],
)
def test_bad_config_is_rejected_before_loading_anything(tiny_lcm_path, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config(tiny_lcm_path, tmp_path, **overrides))


def test_empty_prompt_file_and_existing_run_folder(tiny_lcm_path, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        validate_config(tiny_config(tiny_lcm_path, tmp_path, prompt_file=str(tmp_path / "empty.txt")))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config(tiny_lcm_path, tmp_path))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"epoch": 0}\n'  # nothing the user made is lost


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_two_processes_end_with_identical_lora_weights_for_a_group_algorithm(tiny_lcm_path, tmp_path):
    # Each rank dumps its own LoRA weights after training; DDP must have kept them in sync. GRPO: groups of 2 samples,
    # a step loss whose non-final backward passes skip DDP's all-reduce.
    script = write_weights_dump_script(tmp_path / "two_ranks.py", f"""trainer.train(tiny_config(
        {str(tiny_lcm_path)!r}, {str(tmp_path)!r}, num_epochs=1, algorithm="grpo", **{{"grpo.k": 2, "grpo.clip_range": 0.1}}))""")
    launch_two_processes(script)
    rank0, rank1 = (torch.load(tmp_path / "run" / f"rank{i}.pt") for i in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if "lora_B" in k), "no update happened"
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["reward_queries"] == 2 * 2 * 2 * 2  # two processes, each 2 batches x 2 prompts x 2 samples


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_two_process_pair_gradients_equal_one_process_on_the_concatenated_batch(tiny_lcm_path, tmp_path):
    # DDP averages gradients at the sync backward; REBEL's per-pair scale must be in before it. Each rank takes half of
    # the same 4 pairs; the averaged gradient must equal one process's gradient on all 4.
    script = write_script(tmp_path / "pair_ranks.py", f"""
        import torch
        from accelerate import Accelerator
        import rebel_diffusion.trainer as trainer
        from configs.base import get_config
        from rebel_diffusion.algorithms import ALGORITHMS
        from test_trainer import _policy_and_pairs

        policy, batch, targets = _policy_and_pairs({str(tiny_lcm_path)!r}, 4)
        accelerator = Accelerator(cpu=True)
        policy.model = accelerator.prepare(policy.model)
        rank = accelerator.process_index
        half = list(range(4 * rank, 4 * rank + 4))
        with accelerator.accumulate(policy.model):
            trainer.pair_loss_gradients(accelerator, policy, ALGORITHMS["rebel"], batch[half], targets[half],
                                        get_config())
        torch.save([p.grad for p in policy.trainable_parameters()], {str(tmp_path)!r} + f"/grad{{rank}}.pt")
    """)
    launch_two_processes(script)
    from accelerate import Accelerator

    policy, batch, targets = _policy_and_pairs(tiny_lcm_path, 4)
    trainer.pair_loss_gradients(Accelerator(cpu=True), policy, ALGORITHMS["rebel"], batch, targets, get_config())
    expected = _grads(policy)
    for rank in (0, 1):
        _assert_grads_close(torch.load(tmp_path / f"grad{rank}.pt"), expected)


def test_aesthetic_reward_runs_end_to_end(tiny_lcm_path, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    head = REPO.parent / "shared" / "assets" / "sac+logos+ava1-l14-linearMSE.pth"
    if not head.is_file():
        pytest.skip(f"the aesthetic head is not at {head}")
    # A 2-layer ViT with ViT-L-14's 768-d embedding, saved as a local checkpoint like a user's offline copy.
    (tmp_path / "tiny-vit.json").write_text(json.dumps({
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 1, "layers": 1},
    }))
    open_clip.add_model_config(tmp_path / "tiny-vit.json")
    torch.save(open_clip.create_model("tiny-vit").state_dict(), tmp_path / "tiny-vit.pt")
    config = tiny_config(tiny_lcm_path, tmp_path, num_epochs=1, **{
        "reward.name": "aesthetic", "reward.head_path": str(head), "reward.clip_model": "tiny-vit",
        "reward.clip_pretrained": str(tmp_path / "tiny-vit.pt"),
    })
    metrics = read_metrics(train(config))
    assert 0.0 < metrics[0]["reward_mean"] < 12.0 and metrics[0]["reward_std"] > 0


def test_missing_aesthetic_head_is_a_config_error(tiny_lcm_path, tmp_path):
    config = tiny_config(tiny_lcm_path, tmp_path, **{"reward.name": "aesthetic",
                                                     "reward.head_path": str(tmp_path / "missing.pth")})
    with pytest.raises(ConfigError, match="reward.head_path"):
        train(config)


# A 2-epoch seed-0 run of each algorithm on the shipped tiny model, measured before the algorithm interface existed.
# The reward is smooth (mean brightness), so fp32 rounding cannot flip a quantised pixel the way it can for JPEG sizes.
PINNED = {
    "rebel": {
        "metrics": [
            {"epoch": 0, "reward_mean": 0.6082510948181152, "reward_std": 0.32056745886802673, "reward_queries": 8,
             "optimizer_steps": 2, "loss": 3.9974513053894043, "grad_norm": 0.8649943470954895},
            {"epoch": 1, "reward_mean": 0.3184322118759155, "reward_std": 0.22900323569774628, "reward_queries": 16,
             "optimizer_steps": 4, "loss": 4.187541961669922, "grad_norm": 1.0534374713897705},
        ],
        "lora_abs_sum": 2051.78844747566,
    },
    "ppo": {
        "metrics": [
            {"epoch": 0, "reward_mean": 0.621890664100647, "reward_std": 0.3145059049129486, "reward_queries": 4,
             "optimizer_steps": 4, "loss": -2.963202314276714e-05, "approx_kl": 1.586680582477129e-07,
             "clipfrac": 0.5714285969734192, "grad_norm": 0.012953521683812141},
            {"epoch": 1, "reward_mean": 0.3181407153606415, "reward_std": 0.22062985599040985, "reward_queries": 8,
             "optimizer_steps": 8, "loss": 0.05585877224802971, "approx_kl": 2.498141249418495e-08,
             "clipfrac": 0.4107142984867096, "grad_norm": 0.016064263880252838},
        ],
        "lora_abs_sum": 2058.317270143725,
    },
}


@pytest.mark.parametrize("algorithm", ["rebel", "ppo"])
def test_rebel_and_ppo_keep_their_pinned_numbers(algorithm, tmp_path, monkeypatch):
    (tmp_path / "pin_reward.py").write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_config(REPO / "assets" / "tiny-lcm", tmp_path, algorithm=algorithm,
                         prompt_file=str(REPO / "assets" / "quickstart_prompts.txt"),
                         **{"reward.name": "pin_reward:brightness", "grid.num_prompts": 0,
                            "train.num_inner_epochs": 2 if algorithm == "ppo" else 1})
    run_dir = train(config)
    pinned = PINNED[algorithm]
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [0, 1]
    for got, want in zip(metrics, pinned["metrics"]):
        for key, value in want.items():
            # PPO's first loss is a near-cancelling sum of O(1) terms (z-scored advantages): fp32 rounding is absolute.
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6 if key == "loss" else 1e-9), (got["epoch"], key)
    lora = load_file(run_dir / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors")
    assert sum(v.double().abs().sum().item() for v in lora.values()) == pytest.approx(pinned["lora_abs_sum"], rel=1e-5)


def _policy_and_pairs(model_path: Path, num_pairs: int):
    """A tiny-LCM policy whose LoRA moved after sampling (so the log-ratios are not zero), pairs and targets."""
    from rebel_diffusion.policies.lcm import LCMPolicy

    torch.manual_seed(0)  # peft draws the LoRA init from the global RNG
    policy = LCMPolicy.from_pretrained(model_path, resolution=32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    prompts = ["a red circle on a white background", "a blue square on a black background", "a cyan cross"]
    batch = policy.sample([prompts[i % 3] for i in range(2 * num_pairs)], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return policy, batch, torch.randn(2 * num_pairs, generator=generator)


def _grads(policy) -> list[torch.Tensor]:
    return [p.grad.clone() for p in policy.trainable_parameters()]


def _assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    # rtol 1e-5 elementwise; elements that are near-cancelling sums get fp32 rounding relative to the tensor's scale.
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def _zero_grads(policy) -> None:
    for p in policy.trainable_parameters():
        p.grad = None


def _full_graph_loss(policy, algorithm, batch, targets, config):
    """The textbook loss: every step's log-prob in one graph (T UNet graphs alive at once)."""
    log_prob, kl = policy.log_prob(batch, range(policy.num_actions), with_kl=config.kl_coef > 0)
    if algorithm.pair_loss is not None:
        ratio = (log_prob - batch.log_probs).sum(dim=1)
        return algorithm.pair_loss(ratio[0::2], ratio[1::2], targets[0::2], targets[1::2], config)
    if algorithm.name == "rloo":  # written out here, not through the algorithm: PPO's objective summed over steps
        ratio, eps, advantages = torch.exp(log_prob - batch.log_probs), config.rloo.clip_range, targets[:, None]
        objective = torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
        return -(objective * batch.mask).sum(dim=1).mean()
    loss, _ = algorithm.step_loss(log_prob, batch.log_probs, targets, config, 0)
    if config.kl_coef > 0:
        loss = loss + config.kl_coef * kl
    return loss.mean() if algorithm.step_reduction == "mean" else loss.sum(dim=1).mean()


@pytest.mark.parametrize("name, num_pairs", [("rebel", 1), ("rebel", 3), ("online_dpo", 2), ("ppo", 2), ("grpo", 2),
                                             ("rloo", 2)])
def test_per_step_gradients_equal_the_full_graph(tiny_lcm_path, name, num_pairs):
    from accelerate import Accelerator

    algorithm = ALGORITHMS[name]
    config = get_config()
    config.kl_coef = 0.0 if algorithm.kl_in_reward else 0.3  # the KL loss term is part of the gradient checked
    config.ppo.clip_range = config.grpo.clip_range = config.rloo.clip_range = 0.05
    config.dpo.beta = 5.0
    policy, batch, targets = _policy_and_pairs(tiny_lcm_path, num_pairs)
    _full_graph_loss(policy, algorithm, batch, targets, config).backward()
    expected = _grads(policy)
    _zero_grads(policy)
    accelerator = Accelerator(cpu=True)
    if algorithm.pair_loss is not None:
        stats = trainer.pair_loss_gradients(accelerator, policy, algorithm, batch, targets, config)
    else:
        stats = trainer.step_loss_gradients(accelerator, policy, algorithm, batch, targets, config, 0)
    assert torch.isfinite(stats["loss"])
    assert any(g.abs().sum() > 0 for g in expected)
    _assert_grads_close(_grads(policy), expected)


def test_pair_gradients_add_up_under_gradient_accumulation(tiny_lcm_path):
    from accelerate import Accelerator

    rebel, config = ALGORITHMS["rebel"], get_config()
    policy, batch, targets = _policy_and_pairs(tiny_lcm_path, 4)
    halves = [(batch[list(range(0, 4))], targets[:4]), (batch[list(range(4, 8))], targets[4:])]
    sum(_full_graph_loss(policy, rebel, b, t, config) / 2 for b, t in halves).backward()
    expected = _grads(policy)
    _zero_grads(policy)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    for b, t in halves:  # the second micro-batch's pairs must not rescale the first one's accumulated gradient
        trainer.pair_loss_gradients(accelerator, policy, rebel, b, t, config)
    _assert_grads_close(_grads(policy), expected)


@pytest.mark.parametrize("name", ["rebel", "ppo", "rloo", "grpo", "online_dpo"])
def test_every_algorithms_loss_on_text_trajectories_equals_a_hand_computation(name):
    from accelerate import Accelerator

    from rebel_diffusion.algorithms import clipped_surrogate, online_dpo_loss, rebel_loss
    from rebel_diffusion.policies.causal_lm import CausalLMPolicy

    torch.manual_seed(0)
    policy = CausalLMPolicy.from_pretrained(REPO / "assets" / "tiny-lm", max_new_tokens=4, temperature=0.7,
                                            chat_template=False)
    prompts = ["12+34=", "56+78=", "90+11=", "23+45="]  # equal lengths: no prompt padding in the hand computation
    batch = policy.sample(prompts)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    targets = torch.tensor([1.0, -0.5, 0.25, 2.0])
    config = get_config()
    config.ppo.clip_range = config.grpo.clip_range = config.rloo.clip_range = 0.05
    config.train.num_inner_epochs = 2  # RLOO's clipped ratio, like PPO's

    with torch.no_grad():  # an independent forward: prompt + response ids, logits at the positions before each token
        ids = torch.cat([batch.states, batch.actions], dim=1)
        logits = policy.network(input_ids=ids).logits[:, batch.states.shape[1] - 1 : -1] / 0.7
        log_prob = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.actions[..., None])[..., 0]
        mask = batch.mask.float()
        ratio = (log_prob - batch.log_probs) * mask
        if name == "rebel":
            expected = rebel_loss(ratio.sum(1)[0::2], ratio.sum(1)[1::2], targets[0::2], targets[1::2], 1.0)
        elif name == "online_dpo":
            expected = online_dpo_loss(ratio.sum(1)[0::2], ratio.sum(1)[1::2], targets[0::2], targets[1::2], 0.1)
        else:
            surrogate, _ = clipped_surrogate(log_prob - batch.log_probs, targets.clamp(-5.0, 5.0) if name == "grpo"
                                             else targets.clamp(-10.0, 10.0) if name == "ppo" else targets, 0.05)
            per_sample = (surrogate * mask).sum(1)
            expected = (per_sample.sum() / mask.sum()) if name != "rloo" else per_sample.mean()
    algorithm = ALGORITHMS[name]
    accelerator = Accelerator(cpu=True)
    if algorithm.pair_loss is not None:
        stats = trainer.pair_loss_gradients(accelerator, policy, algorithm, batch, targets, config)
    else:
        stats = trainer.step_loss_gradients(accelerator, policy, algorithm, batch, targets, config, 1)
    assert stats["loss"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_scoring_rewards_beside_sampling_gives_the_sequential_results(tiny_lcm_path, tmp_path, monkeypatch):
    (tmp_path / "slow_reward.py").write_text("import time\ndef reward(images, prompts):\n    time.sleep(0.05)\n"
                                             "    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {}
    for overlap in (True, False):
        config = tiny_config(tiny_lcm_path, tmp_path / str(overlap), num_epochs=2, **{
            "reward.name": "slow_reward:reward", "sample.overlap_reward": overlap, "grid.num_prompts": 0})
        runs[overlap] = [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(train(config))]
    assert runs[True] == runs[False]


def test_a_reward_drawing_random_numbers_gets_a_seeded_generator_and_runs_without_grad(tiny_lcm_path, tmp_path,
                                                                                         monkeypatch):
    (tmp_path / "noisy_reward.py").write_text(textwrap.dedent("""
        import time, torch
        grad_enabled = []
        def reward(images, prompts, generator=None):
            grad_enabled.append(torch.is_grad_enabled())
            time.sleep(0.05)  # overlapped, the next batch samples meanwhile, drawing from torch's global RNG
            return images.mean(dim=(1, 2, 3)) + torch.rand(len(prompts), generator=generator)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import noisy_reward

    runs = {}
    for overlap in (True, False):
        config = tiny_config(tiny_lcm_path, tmp_path / str(overlap), num_epochs=2, **{
            "reward.name": "noisy_reward:reward", "sample.overlap_reward": overlap, "grid.num_prompts": 0})
        runs[overlap] = [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(train(config))]
    assert len(noisy_reward.grad_enabled) == 2 * 2 * 2 and not any(noisy_reward.grad_enabled)
    assert runs[True] == runs[False]


def test_the_reward_thread_takes_the_calling_threads_autocast_and_a_generator_per_batch():
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    seen = []

    def reward(outputs, prompts, generator=None):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled(),
                     torch.rand(1, generator=generator).item()))
        return torch.zeros(len(prompts))

    batch = SimpleNamespace(outputs=torch.zeros(2, 3, 4, 4), prompts=["a", "b"])
    with ThreadPoolExecutor(max_workers=1) as scorer:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trainer._submit_score(scorer, "cpu", reward, batch, "r", 0, "", trainer._reward_generator(0, 0, 0, 0)).result()
        trainer._submit_score(scorer, "cpu", reward, batch, "r", 0, "", trainer._reward_generator(0, 0, 0, 0)).result()
        for other in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]:
            trainer._submit_score(scorer, "cpu", reward, batch, "r", 0, "", trainer._reward_generator(*other)).result()
    assert seen[0][:3] == (True, torch.bfloat16, False) and seen[1][:3] == (False, seen[1][1], False)
    draws = [s[3] for s in seen]
    assert draws[0] == draws[1] and len(set(draws[1:])) == 5  # (seed, process, epoch, batch) each change the draws


def text_config(logdir: Path, **overrides):
    """The text quickstart, cut to a few seconds: the shipped tiny addition LM, 2 epochs of 8 prompts."""
    from configs.quickstart_text_rebel import get_config as text_quickstart

    config = text_quickstart()
    config.model.pretrained = str(REPO / "assets" / "tiny-lm")
    config.prompt_file = str(REPO / "assets" / "addition_train_prompts.txt")
    config.eval.prompt_file = ""
    config.logdir, config.run_name, config.log_with = str(logdir), "run", ""
    config.num_epochs, config.save_freq = 2, 1
    config.sample.batch_size, config.sample.num_batches_per_epoch = 4, 2
    config.train.batch_size, config.train.gradient_accumulation_steps = 2, 2
    config.grid.num_prompts = 2
    return override(config, overrides)


def test_text_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = train(text_config(tmp_path / "a", num_epochs=4, save_freq=2))
    first = train(text_config(tmp_path / "b", num_epochs=2, save_freq=2))
    resumed = train(text_config(tmp_path / "b", num_epochs=4, save_freq=2, run_name="", resume_from=str(first)))

    def strip(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert strip(read_metrics(resumed)) == strip(read_metrics(straight))
    a = load_file(straight / "checkpoints" / "epoch_0004" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / "epoch_0004" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "grid_last.jsonl").read_text() == (resumed / "grid_last.jsonl").read_text()


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_two_text_processes_end_with_identical_weights(tmp_path):
    script = write_weights_dump_script(tmp_path / "text_ranks.py",
                                       f"trainer.train(text_config({str(tmp_path)!r}, num_epochs=1))")
    launch_two_processes(script)
    rank0, rank1 = (torch.load(tmp_path / "run" / f"rank{i}.pt") for i in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if "lora_B" in k), "no update happened"


# Temperature 2: the two responses of a pair differ (the tiny LM often repeats itself at 0.7, and a pair of equal
# responses has no gradient).
PER_PROCESS_TARGETS = {"num_epochs": 1, "grid.num_prompts": 0, "sample.batch_size": 8, "sample.num_batches_per_epoch": 1,
                       "train.batch_size": 8, "train.gradient_accumulation_steps": 1, "train.num_inner_epochs": 1,
                       "model.temperature": 2.0, "reward.name": "rank_reward:reward"}


@pytest.mark.slow  # processes started by hand or by the launcher: seconds each
def test_each_process_trains_on_its_own_rows_of_the_targets(tmp_path):
    # Two ranks whose rewards differ; each records its local gradient as DDP hands it to the all-reduce (a comm hook),
    # its samples and the targets of all processes. Each local gradient must be one process's gradient on the rank's
    # own samples with the rank's own rows of the targets.
    (tmp_path / "rank_reward.py").write_text(
        "import os, torch\n"
        "def reward(responses, prompts):\n"
        "    rank = int(os.environ['RANK'])\n"
        "    return torch.tensor([float(sum(map(ord, p + r)) % 7) * (1 - 3 * rank) + 5 * rank\n"
        "                         for p, r in zip(prompts, responses)])\n")
    script = write_script(tmp_path / "target_ranks.py", f"""
        import dataclasses, sys, torch
        import torch.distributed.algorithms.ddp_comm_hooks.default_hooks as default_hooks
        sys.path.insert(0, {str(tmp_path)!r})
        import rebel_diffusion.trainer as trainer
        from rebel_diffusion.algorithms import ALGORITHMS
        from test_trainer import PER_PROCESS_TARGETS, text_config

        record = {{}}

        class RecordingAccelerator(trainer.Accelerator):
            def prepare(self, *args, **kwargs):
                prepared = super().prepare(*args, **kwargs)
                ddp = prepared[0]
                names = {{p: n for n, p in ddp.module.named_parameters()}}
                record["initial"] = {{n: p.detach().clone() for n, p in ddp.module.named_parameters() if p.requires_grad}}

                def hook(state, bucket):  # before the all-reduce: this rank's own gradient
                    for p, g in zip(bucket.parameters(), bucket.gradients()):
                        record.setdefault("local_grads", {{}})[names[p]] = g.detach().clone()
                    return default_hooks.allreduce_hook(None, bucket)

                ddp.register_comm_hook(None, hook)
                return prepared

        rebel = ALGORITHMS["rebel"]
        def targets(*args):
            record["targets"] = rebel.targets(*args)
            return record["targets"]
        ALGORITHMS["rebel"] = dataclasses.replace(rebel, targets=targets)
        original_cat = trainer.Trajectory.cat
        def cat(batches):
            record["samples"] = original_cat(batches)
            return record["samples"]
        trainer.Trajectory.cat = cat
        trainer.Accelerator = RecordingAccelerator
        config = text_config({str(tmp_path)!r}, **PER_PROCESS_TARGETS)
        trainer.train(config)
        torch.save(record, {str(tmp_path)!r} + f"/rank{{trainer.PartialState().process_index}}.pt")
    """)
    launch_two_processes(script)
    from accelerate import Accelerator

    from rebel_diffusion.policies import make_policy

    records = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    all_targets = records[0]["targets"]
    assert (records[1]["targets"] == all_targets).all() and all_targets.shape == (16, 2)
    halves = torch.as_tensor(all_targets, dtype=torch.float32).reshape(2, -1)
    assert not torch.equal(halves[0], halves[1])  # the rewards differ per process, so do the targets
    config = text_config(tmp_path / "one", **PER_PROCESS_TARGETS)
    policy = make_policy(config, torch.device("cpu"), torch.float32)
    for rank, record in enumerate(records):
        with torch.no_grad():
            for name, param in policy.model.named_parameters():
                if param.requires_grad:
                    param.copy_(record["initial"][name])
        _zero_grads(policy)
        trainer.pair_loss_gradients(Accelerator(cpu=True), policy, ALGORITHMS["rebel"], record["samples"], halves[rank],
                                    config)
        names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
        assert sorted(record["local_grads"]) == sorted(names)
        expected = _grads(policy)
        assert any(g.abs().sum() > 0 for g in expected), rank
        _assert_grads_close([record["local_grads"][n] for n in names], expected)


def test_a_prompt_longer_than_the_context_is_rejected_before_training(tmp_path):
    (tmp_path / "long.txt").write_text("1+2=\n" + "9" * 5000 + "+1=\n")
    with pytest.raises(ConfigError, match=r"prompt_file: prompt '9999.*' has \d+ tokens; the model's context of \d+ "
                                          r"minus max_new_tokens=4"):
        train(text_config(tmp_path, prompt_file=str(tmp_path / "long.txt")))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_response_without_eos_gets_the_missing_eos_penalty(tmp_path, monkeypatch):
    (tmp_path / "always_one.py").write_text("import torch\ndef reward(responses, prompts):\n"
                                            "    return torch.ones(len(responses))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # One new token: the answer's first digit, never an EOS, so every response is cut by the length limit.
    config = text_config(tmp_path, num_epochs=1, **{"model.max_new_tokens": 1, "reward.name": "always_one:reward",
                                                    "reward.missing_eos_penalty": -1.0})
    assert read_metrics(train(config))[0]["reward_mean"] == -1.0
    config = text_config(tmp_path / "b", num_epochs=1, **{"model.max_new_tokens": 1, "reward.name": "always_one:reward"})
    assert read_metrics(train(config))[0]["reward_mean"] == 1.0


SOAK_RUNS = {
    # PPO (a step loss) on the image quickstart, 6 of its epochs; counts per epoch: ~30 forward passes without
    # gradient (94 in epoch 0, with the held-out evaluation and the first grid), 21 with.
    "image": (["--config", "configs/quickstart_ppo.py", "--config.num_epochs=6", "--config.eval.every=3"],
              [("training", (25, 40)), ("sampling", (3, 25)), ("checkpoint", (2, 2)), ("training", (5, 40))]),
    # REBEL (a pair loss) on the text quickstart, 8 of its epochs; per epoch 7 forward passes without gradient (37 in
    # epoch 0, with the held-out evaluation), 4 with. The first kill comes before any checkpoint: the run starts over.
    "text": (["--config", "configs/quickstart_text_rebel.py", "--config.num_epochs=8", "--config.eval.every=4"],
             [("sampling", (20, 36)), ("training", (5, 12)), ("checkpoint", (1, 3)), ("sampling", (1, 14))]),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SOAK_RUNS))
def test_a_run_killed_at_random_moments_resumes_to_the_uninterrupted_result(kind, tmp_path):
    config_args, kills = SOAK_RUNS[kind]
    common = [*config_args, "--config.save_freq=1", f"--config.logdir={tmp_path}", "--config.log_with="]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    straight = run("train.py", *common, "--config.run_name=straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    rng = random.Random(f"soak-{kind}")
    killed, resume = tmp_path / "killed", []
    for phase, (low, high) in kills:
        n = rng.randint(low, high)
        result = run("tests/kill_at.py", phase, str(n), *common, "--config.run_name=killed", *resume)
        assert result.returncode == -signal.SIGKILL, f"not killed at {phase} event {n}: {result.stderr[-2000:]}"
        resume = [f"--config.resume_from={killed}"]
    final = run("train.py", *common, "--config.run_name=killed", *resume)
    assert final.returncode == 0, final.stderr[-3000:]

    def strip(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    assert strip(read_metrics(killed)) == strip(read_metrics(tmp_path / "straight"))
    assert (killed / "eval.jsonl").read_text() == (tmp_path / "straight" / "eval.jsonl").read_text()
    last = sorted((tmp_path / "straight" / "checkpoints").iterdir())[-1].name
    for file in (tmp_path / "straight" / "checkpoints" / last).glob("*.safetensors"):
        a, b = load_file(file), load_file(killed / "checkpoints" / last / file.name)
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), file.name
    left = [c.name for c in (killed / "checkpoints").iterdir()]
    assert all(re.fullmatch(r"epoch_\d{4}", name) for name in left), f"half-written folders left behind: {left}"


def test_console_line_diversity_and_readable_eval_grid(tiny_lcm_path, tmp_path, capsys):
    """What a user sees: one line per epoch (with the held-out metrics of the epochs evaluated), `diversity` in
    metrics.jsonl and `eval_diversity` in eval.jsonl, and held-out grids of prompts x seeds with the prompts drawn."""
    import numpy as np
    from PIL import Image

    from rebel_diffusion.grids import CELL, LABEL_WIDTH, tile_box

    heldout = ["a green cross", "a purple circle on a white background", "a red square"]
    (tmp_path / "heldout.txt").write_text("\n".join(heldout) + "\n")
    config = tiny_config(tiny_lcm_path, tmp_path, **{"eval.prompt_file": str(tmp_path / "heldout.txt"),
                                                     "eval.every": 2, "eval.num_seeds": 2})
    run_dir = train(config)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3, lines
    number = r"-?\d+\.\d{3}"
    assert re.fullmatch(rf"epoch 0/2  eval_jpeg_compressibility {number}  eval_diversity {number}", lines[0]), lines[0]
    assert re.fullmatch(rf"epoch 1/2  reward {number}  kl \S+  diversity {number}  \d+\.\d s", lines[1]), lines[1]
    assert re.fullmatch(rf"epoch 2/2  reward {number}  kl \S+  diversity {number}  eval_jpeg_compressibility {number}  "
                        rf"eval_diversity {number}  \d+\.\d s", lines[2]), lines[2]

    metrics = read_metrics(run_dir)
    assert all(0 < m["diversity"] < 1 for m in metrics)  # REBEL samples each prompt twice, with different noise
    assert f"diversity {metrics[-1]['diversity']:.3f}" in lines[2]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 2] and all(0 < e["eval_diversity"] < 1 for e in evals)

    for png in ("eval/epoch_0000.png", "eval/epoch_0002.png", "grid_first.png", "grid_last.png"):
        grid = np.asarray(Image.open(run_dir / png).convert("RGB"))
        rows = len(heldout) if png.startswith("eval") else config.grid.num_prompts
        assert grid.shape == (rows * CELL, LABEL_WIDTH + 2 * CELL, 3), png  # rows = prompts, columns = seeds
        for r in range(rows):
            assert (grid[r * CELL : (r + 1) * CELL, :LABEL_WIDTH] < 128).any(), f"{png}: row {r} has no prompt"
            left, top, right, bottom = tile_box(r, 1)
            tile = grid[top:bottom, left:right]
            assert (tile.reshape(32, CELL // 32, 32, CELL // 32, 3) == tile[:: CELL // 32, :: CELL // 32][:, None, :, None]
                    ).all(), f"{png}: tile ({r}, 1) is not a nearest-neighbour upscale of a 32 px image"


def test_held_out_evaluation_gives_a_random_reward_its_own_seeded_generator_and_leaves_the_global_rng_alone():
    from types import SimpleNamespace

    import numpy as np

    class FixedPolicy:
        def sample(self, prompts, generator=None):
            return SimpleNamespace(outputs=torch.zeros(len(prompts), 1))  # evaluate reads only the outputs

    def noisy_reward(outputs, prompts, generator=None):
        return torch.rand(len(prompts), generator=generator)

    prompts, seeds = ["a", "b", "c"], [0, 7]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = trainer.evaluate(FixedPolicy(), prompts, seeds, {"noisy": noisy_reward})[0]["eval_noisy"]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # another global state: the same draws
    assert trainer.evaluate(FixedPolicy(), prompts, seeds, {"noisy": noisy_reward})[0]["eval_noisy"] == first
    # The draws: per seed, a generator seeded from SeedSequence([seed, 2**32]), independent of the sampling seed's.
    expected = []
    for seed in seeds:
        state = int(np.random.SeedSequence([seed, 2**32]).generate_state(1, np.uint64)[0])
        expected.append(torch.rand(3, generator=torch.Generator().manual_seed(state)))
    assert first == pytest.approx(torch.cat(expected).mean().item(), abs=1e-7)
    assert first != pytest.approx(torch.cat([torch.rand(3, generator=torch.Generator().manual_seed(s))
                                             for s in seeds]).mean().item(), abs=1e-7)
