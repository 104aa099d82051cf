"""REBEL's base distribution mu: base-model and offline samples re-scored under pi_t, the group layout, the checks."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import REPO
from test_causal_lm import rescoring_tolerance
from test_lcm import perturb_lora
from test_trainer import read_metrics, tiny_config

from configs.quickstart_text_rebel import get_config as text_config
from rebel_diffusion.algorithms import ALGORITHMS
from rebel_diffusion.algorithms.base import Mu
from rebel_diffusion.policies import adapter_disabled, rescore
from rebel_diffusion.policies.causal_lm import CausalLMPolicy
from rebel_diffusion.policies.lcm import LCMPolicy
from rebel_diffusion.rewards.text import addition_target
from rebel_diffusion.sources import check_mu, sample_groups
from rebel_diffusion.trainer import ConfigError, train, validate_config

TINY_LM = REPO / "assets" / "tiny-lm"
SUMS = ["12+7=", "40+41=", "3+98=", "55+5="]
SHAPES = ["a red circle", "a blue square"]


def perturbed_lm(seed: int = 3) -> CausalLMPolicy:
    """The shipped addition LM with a non-zero adapter, so that pi_t differs from the base model."""
    policy = CausalLMPolicy.from_pretrained(TINY_LM, max_new_tokens=6, temperature=0.7, lora_rank=4,
                                            lora_init="gaussian", lora_targets="lm_head")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return policy


def test_rescoring_a_policy_sample_gives_back_its_log_probs_and_kl(tiny_lcm_path):
    # The sampler computes log-probs and the k1 KL during the chain (LoRA merged); rescore recomputes both by separate
    # policy and reference passes (unmerged): equal up to the fp32 rounding test_lcm bounds at 1e-5.
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32)
    perturb_lora(policy)
    sampled = policy.sample(SHAPES, generator=torch.Generator().manual_seed(0), with_kl=True)
    again = rescore(policy, sampled[[0, 1]], with_kl=True)
    torch.testing.assert_close(again.log_probs, sampled.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.kl, sampled.kl, atol=2e-5, rtol=0)
    assert sampled.kl.abs().max() > 1e-3  # the adapter moved the policy: the KL comparison is not 0 == 0


def test_base_samples_are_the_base_models_chain_scored_under_the_policy(tiny_lcm_path):
    policy = LCMPolicy.from_pretrained(tiny_lcm_path, resolution=32)
    perturb_lora(policy)
    torch.manual_seed(5)
    trajectory, sources = sample_groups(policy, SHAPES, 2, Mu({"base": 1.0}), with_kl=True)
    torch.manual_seed(5)  # the same draws, by hand: the policy's samples, then the base model's
    own = policy.sample(SHAPES)
    with adapter_disabled(policy):
        base = policy.sample(SHAPES)
    assert sources == ["policy", "policy", "base", "base"]
    assert torch.equal(trajectory.actions[:2], own.actions) and torch.equal(trajectory.actions[2:], base.actions)
    assert torch.equal(trajectory.outputs[2:], base.outputs)
    under_policy = torch.cat([policy.log_prob(base, steps)[0] for steps in policy.step_chunks()], dim=1)
    torch.testing.assert_close(trajectory.log_probs[2:], under_policy, atol=1e-5, rtol=0)
    torch.testing.assert_close(trajectory.kl[2:], under_policy - base.log_probs, atol=1e-5, rtol=0)
    assert (trajectory.log_probs[2:] - base.log_probs).abs().max() > 1e-3  # re-scored, not the base's own


def test_an_offline_response_is_the_trajectory_the_policy_would_have_sampled():
    # Responses the policy sampled, given back as offline text: the same tokens, and the log-probs generate's logits
    # gave (an independent path: KV-cached sampling against one re-scoring forward).
    policy = perturbed_lm()
    torch.manual_seed(0)
    sampled = policy.sample(SUMS)
    ended = [i for i in range(len(SUMS)) if not sampled.truncated[i]]
    assert len(ended) >= 2
    sampled = sampled[ended]
    offline = rescore(policy, policy.trajectory_of(sampled.prompts, sampled.outputs), with_kl=True)
    assert torch.equal(offline.actions[offline.mask], sampled.actions[sampled.mask])
    assert offline.outputs == sampled.outputs and not offline.truncated.any()
    torch.testing.assert_close(offline.log_probs * offline.mask, sampled.log_probs[:, : offline.log_probs.shape[1]],
                               atol=rescoring_tolerance(policy, sampled), rtol=0)
    assert offline.kl.abs().max() > 1e-3


def test_on_policy_groups_are_the_policys_own_batch():
    policy = perturbed_lm()
    torch.manual_seed(1)
    grouped, sources = sample_groups(policy, SUMS, 2, Mu({"policy": 1.0}))
    torch.manual_seed(1)
    direct = policy.sample(SUMS * 2)
    assert sources == ["policy"] * 8 and torch.equal(grouped.actions, direct.actions)


def test_a_mix_draws_each_later_sample_from_its_source(tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                            for p in SUMS for r in (str(addition_target(p)), "0")))
    policy = perturbed_lm()
    random.seed(0)
    torch.manual_seed(0)
    prompts = SUMS * 4
    trajectory, sources = sample_groups(policy, prompts, 2, Mu({"policy": 0.5, "offline": 0.5}, str(data), "key"))
    assert sources[:16] == ["policy"] * 16 and {"policy", "offline"} == set(sources[16:])
    for prompt, output, source in zip(trajectory.prompts[16:], trajectory.outputs[16:], sources[16:]):
        if source == "offline":
            assert output in (str(addition_target(prompt)), "0")
    assert trajectory.prompts == prompts * 2  # sample j of group g at j * B + g


@pytest.mark.parametrize("overrides, message", [
    ({"rebel.mu": "elsewhere"}, "rebel.mu must be one of"),
    ({"rebel.mu": "mix", "rebel.mix.base": 0.7}, "summing to 1"),
    ({"rebel.mu": "offline"}, "set rebel.offline_data"),
    ({"rebel.offline_data": "x.jsonl"}, "draws no offline responses"),
])
def test_rebel_refuses_a_bad_mu(overrides, message, tmp_path):
    config = tiny_config(TINY_LM, tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        ALGORITHMS["rebel"].check(config)


def test_check_mu_names_what_the_run_cannot_draw(tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text(json.dumps({"prompt": SUMS[0], "response": "19"}) + "\n")
    offline = Mu({"offline": 1.0}, str(data), "rebel.offline_data")
    with pytest.raises(ValueError, match=r"no response for 1 of the 2 prompts of prompt_file \(the first: '40\+41='\)"):
        check_mu(offline, CausalLMPolicy, SUMS[:2], lora_rank=4)
    with pytest.raises(ValueError, match="offline responses need a text policy"):
        check_mu(offline, LCMPolicy, SUMS[:1], lora_rank=4)
    with pytest.raises(ValueError, match="set lora.rank > 0"):
        check_mu(Mu({"base": 1.0}), CausalLMPolicy, SUMS, lora_rank=0)
    check_mu(offline, CausalLMPolicy, SUMS[:1], lora_rank=4)


def test_a_run_with_offline_and_base_mu_logs_where_each_pair_came_from(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SUMS) + "\n")
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": str(addition_target(p))}) + "\n" for p in SUMS))
    config = text_config()
    config.logdir, config.run_name, config.log_with = str(tmp_path / "runs"), "mu", ""
    config.prompt_file, config.eval.prompt_file, config.grid.num_prompts = str(prompts), "", 0
    config.num_epochs, config.save_freq = 1, 1
    config.sample.batch_size, config.train.batch_size = 32, 16
    config.rebel.mu, config.rebel.offline_data = "mix", str(data)
    config.rebel.mix.policy, config.rebel.mix.base, config.rebel.mix.offline = 0.0, 0.5, 0.5
    config.kl_coef = 0.1
    (metrics,) = read_metrics(train(config))
    assert metrics["mu_policy_fraction"] == 0 and metrics["mu_base_fraction"] + metrics["mu_offline_fraction"] == 1
    assert 0 < metrics["mu_offline_fraction"] < 1
    assert metrics["reward_offline_mean"] == 1.0  # every offline response is the right sum
    assert metrics["reward_queries"] == 64

    config.run_name, config.lora.rank = "no-adapter", 0
    with pytest.raises(ConfigError, match="set lora.rank > 0"):
        validate_config(config)


def test_the_chat_config_accepts_the_chosen_answers_of_a_preference_set_as_offline_mu(tmp_path):
    # Shaped like HuggingFaceH4/ultrafeedback_binarized: a prompt column and a `chosen` conversation per row.
    rows = [{"prompt": q, "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Name a prime.", "7"), ("Say hi.", "Hi!")]]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from configs.chat_rebel import get_config as chat_config

    config = chat_config()
    config.logdir = str(tmp_path / "runs")
    config.prompt_file = f"{data}:train_prefs:prompt"
    config.rebel.mu, config.rebel.offline_data = "offline", f"{data}:train_prefs:prompt:chosen"
    prompts, algorithm = validate_config(config)
    assert prompts == ["Name a prime.", "Say hi."] and algorithm.mu(config).probabilities == {"offline": 1.0}
