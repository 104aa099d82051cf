"""The shipped configs hold the paper's settings (REBEL paper, Appendix I.3.3) and every key outside scripts use."""

from pathlib import Path

import pytest

from configs import aesthetic_ppo, aesthetic_rebel, base

STABLE_KEYS = [
    "algorithm", "seed", "num_epochs", "logdir", "run_name", "resume_from", "save_freq", "resolution",
    "model.pretrained", "reward.name", "prompt_file", "sample.batch_size", "sample.num_batches_per_epoch",
    "train.batch_size", "train.gradient_accumulation_steps", "train.learning_rate", "train.num_inner_epochs",
]


def get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("key", STABLE_KEYS)
def test_keys_outside_scripts_rely_on_exist(key):
    get(base.get_config(), key)


def test_aesthetic_rebel_is_the_papers_setting():
    c = aesthetic_rebel.get_config()
    assert (c.algorithm, c.reward.name, c.resolution, c.model.pretrained) == (
        "rebel", "aesthetic", 768, "SimianLuo/LCM_Dreamshaper_v7")
    assert (c.train.learning_rate, c.rebel.eta, c.train.gradient_accumulation_steps, c.train.max_grad_norm) == (
        3e-4, 1.0, 8, 5.0)
    assert (c.num_epochs, c.sample.num_batches_per_epoch, c.sample.batch_size, c.train.batch_size) == (100, 10, 8, 1)
    assert (c.train.num_inner_epochs, c.stat_tracker.buffer_size, c.stat_tracker.min_count) == (1, 32, 16)
    assert (c.lora.rank, c.lora.alpha, c.model.num_steps, c.model.logprob_reduction) == (8, 8.0, 8, "mean")


def test_aesthetic_ppo_is_the_papers_setting():
    c = aesthetic_ppo.get_config()
    assert (c.algorithm, c.train.learning_rate, c.ppo.clip_range, c.ppo.adv_clip_max) == ("ppo", 1e-4, 1e-4, 10.0)
    assert (c.train.num_inner_epochs, c.train.batch_size, c.sample.batch_size) == (2, 2, 8)
    assert (c.train.gradient_accumulation_steps, c.train.max_grad_norm, c.num_epochs) == (8, 5.0, 100)


def test_aesthetic_prompts_are_the_45_animals():
    repo = Path(__file__).resolve().parents[1]
    prompts = (repo / aesthetic_rebel.get_config().prompt_file).read_text().split()
    assert len(prompts) == 45 and prompts[0] == "cat" and prompts[-1] == "kangaroo"


def test_tldr_rebel_is_the_papers_setting():
    from configs import tldr_rebel

    c = tldr_rebel.get_config()
    assert (c.policy, c.algorithm, c.model.pretrained) == ("causal_lm", "rebel", "vwxyzjn/EleutherAI_pythia-2.8b-deduped__sft__tldr")
    assert c.reward.reward_model_path == "vwxyzjn/EleutherAI_pythia-2.8b-deduped__reward__tldr"
    assert (c.train.learning_rate, c.train.lr_schedule, c.train.num_inner_epochs, c.rebel.eta, c.kl_coef) == (
        3e-6, "linear", 4, 1.0, 0.05)
    assert (c.model.temperature, c.model.max_new_tokens, c.lora.rank, c.lora.alpha) == (0.7, 53, 1024, 2048.0)
    assert c.sample.batch_size * c.sample.num_batches_per_epoch * 8 == 512  # prompts per update on 8 GPUs
    assert c.reward.missing_eos_penalty == -1.0


@pytest.mark.parametrize("algorithm", ["rebel", "ppo", "rloo", "grpo", "online_dpo"])
def test_quickstarts_spend_equal_reward_queries_and_optimizer_steps(algorithm):
    import importlib

    from rebel_diffusion.algorithms import ALGORITHMS

    for prefix in ("quickstart", "quickstart_text"):
        reference = importlib.import_module(f"configs.{prefix}_rebel").get_config()
        c = importlib.import_module(f"configs.{prefix}_{algorithm}").get_config()
        assert c.algorithm == algorithm and c.num_epochs == reference.num_epochs

        def budget(config):
            groups = config.sample.batch_size * config.sample.num_batches_per_epoch
            queries = groups * ALGORITHMS[config.algorithm].group_size(config)
            steps = groups // (config.train.batch_size * config.train.gradient_accumulation_steps)
            return queries, steps * config.train.num_inner_epochs

        assert budget(c) == budget(reference), prefix
