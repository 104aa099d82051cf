"""The shipped configs hold the paper's settings (REBEL paper, Appendix I.3.3) and every key outside scripts use."""

import re
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


@pytest.mark.parametrize("prefix, algorithm", [
    *[(prefix, a) for prefix in ("quickstart", "quickstart_text", "carry_text")
      for a in ("rebel", "ppo", "rloo", "grpo", "online_dpo")],
    ("quickstart", "rebel_preference"), ("carry_text", "rebel_preference")])
def test_quickstarts_spend_equal_reward_queries_and_optimizer_steps(prefix, algorithm):
    import importlib

    from rebel_diffusion.algorithms import ALGORITHMS

    reference = importlib.import_module(f"configs.{prefix}_rebel").get_config()
    c = importlib.import_module(f"configs.{prefix}_{algorithm}").get_config()
    assert c.algorithm == algorithm and c.num_epochs == reference.num_epochs

    def budget(config):
        groups = config.sample.batch_size * config.sample.num_batches_per_epoch
        spec = ALGORITHMS[config.algorithm]
        # A preference query is one comparison; a reward query one scored sample.
        queries = groups * (len(spec.comparisons) if spec.comparisons else spec.group_size(config))
        steps = groups // (config.train.batch_size * config.train.gradient_accumulation_steps)
        return queries, steps * config.train.num_inner_epochs

    assert budget(c) == budget(reference)


def test_the_carry_task_differs_from_the_text_quickstart_only_in_its_model_and_temperature():
    from configs import carry_text_ppo, quickstart_text_ppo
    from rebel_diffusion.config_keys import flatten

    carry, quickstart = flatten(carry_text_ppo.get_config().to_dict()), flatten(quickstart_text_ppo.get_config().to_dict())
    assert {k for k in carry if carry[k] != quickstart[k]} == {"model.pretrained", "model.temperature"}
    assert (carry["model.pretrained"], carry["model.temperature"]) == ("assets/tiny-lm-carry", 1.0)


def readme_config_keys() -> set[str]:
    """The keys the README's "Config keys" table documents (the backticked names of each row's first column)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Config keys you are expected to change", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "the README's config keys table is gone"
    return {key for row in rows for key in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_the_readme_documents_every_key_of_base_and_only_those():
    from rebel_diffusion.config_keys import flatten

    documented, keys = readme_config_keys(), set(flatten(base.get_config().to_dict()))
    assert not documented - keys, f"documented in the README but not in configs/base.py: {sorted(documented - keys)}"
    assert not keys - documented, f"in configs/base.py but not in the README's table: {sorted(keys - documented)}"


def test_every_policy_and_reward_key_of_base_has_an_owner():
    from rebel_diffusion.config_keys import TRAINER_REWARD_KEYS, flatten, policy_keys
    from rebel_diffusion.rewards import rewards_taking

    keys = set(flatten(base.get_config().to_dict()))
    owned = set().union(*policy_keys().values())
    assert owned <= keys, sorted(owned - keys)
    for key in sorted(keys):
        if key.startswith(("model.", "lora.")) or key in ("resolution", "sample.decode_batch_size"):
            assert key in owned, f"{key}: no policy reads it"
        elif key.startswith("reward.") and key not in owned and key.removeprefix("reward.") not in TRAINER_REWARD_KEYS:
            # reward.judge.model belongs to the factory parameter `judge`
            assert rewards_taking(key.removeprefix("reward.").split(".")[0]), f"{key}: no reward takes it"


def text_base():
    from configs import quickstart_text_rebel

    return quickstart_text_rebel.get_config()


@pytest.mark.parametrize("make, key, value, message", [
    (base.get_config, "model.max_new_tokens", 10, "model.max_new_tokens does not apply to policy 'lcm' (only to causal_lm)"),
    (base.get_config, "reward.missing_eos_penalty", -1.0, "reward.missing_eos_penalty does not apply to policy 'lcm'"),
    (text_base, "model.num_steps", 4, "model.num_steps does not apply to policy 'causal_lm' (only to ddim, flow_match, lcm)"),
    (text_base, "model.guidance_scale", 2.0, "model.guidance_scale does not apply to policy 'causal_lm'"),
    (text_base, "resolution", 256, "resolution does not apply to policy 'causal_lm'"),
    (text_base, "sample.decode_batch_size", 2, "sample.decode_batch_size does not apply to policy 'causal_lm'"),
    (base.get_config, "reward.head_path", "/h.pth",
     "reward.head_path is set, but reward 'jpeg_compressibility' takes no such option (an option of aesthetic)"),
    (text_base, "reward.batch_size", 4, "reward.batch_size is set, but reward 'addition_exact' takes no such option"),
    (text_base, "reward.judge.model", "m",
     "reward.judge.model is set, but reward 'addition_exact' takes no such option (an option of judge)"),
])
def test_a_key_set_for_another_policy_or_reward_is_rejected_before_loading(make, key, value, message):
    from rebel_diffusion.trainer import ConfigError, validate_config

    config = make()
    node, *parents, leaf = config, *key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(config)


def test_keys_of_the_runs_own_policy_rewards_and_other_algorithms_are_accepted():
    from rebel_diffusion.config_keys import check_config_keys

    c = aesthetic_rebel.get_config()
    c.reward.head_path, c.reward.batch_size, c.algorithm = "/h.pth", 8, "grpo"  # rebel.* stays set: not checked
    check_config_keys(c)
    c.reward.name = "jpeg_compressibility"
    check_config_keys(c, eval_rewards=["aesthetic"])  # the held-out rewards get the reward options too
    t = text_base()
    t.reward.missing_eos_penalty, t.model.top_k = -1.0, 5
    check_config_keys(t)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                                        if p.stem != "__init__"))
def test_every_shipped_config_passes_the_key_check(name):
    import importlib

    from rebel_diffusion.config_keys import check_config_keys

    check_config_keys(importlib.import_module(f"configs.{name}").get_config())


def test_sd35_pickscore_grpo_is_flow_grpos_setting_and_rebel_spends_the_same_images():
    from configs import sd35_pickscore_grpo, sd35_pickscore_rebel
    from rebel_diffusion.algorithms import ALGORITHMS

    g, r = sd35_pickscore_grpo.get_config(), sd35_pickscore_rebel.get_config()
    # flow_grpo's pickscore_sd3 (config/grpo.py, config/base.py).
    assert (g.model.pretrained, g.model.num_steps, g.model.guidance_scale, g.resolution) == (
        "stabilityai/stable-diffusion-3.5-medium", 10, 4.5, 512)
    assert (g.sample.sde, g.sample.noise_level, tuple(g.sample.sde_window), g.grpo.k) == ("flow_sde", 0.7, (0, 9), 24)
    assert (g.grpo.clip_range, g.grpo.adv_clip_max, g.kl_coef, g.train.learning_rate) == (1e-4, 5.0, 0.01, 3e-4)
    assert (g.lora.rank, g.lora.alpha, g.train.max_grad_norm, g.train.adam_weight_decay) == (32, 64.0, 1.0, 1e-4)

    def per_epoch(c):
        """Images sampled and optimizer steps per process and epoch."""
        groups = c.sample.batch_size * c.sample.num_batches_per_epoch
        images = groups * ALGORITHMS[c.algorithm].group_size(c)
        return images, groups // (c.train.batch_size * c.train.gradient_accumulation_steps)

    assert per_epoch(g) == per_epoch(r) == (144, 2)  # 48 prompts x 24 images over 8 processes; 2 steps an epoch
    assert (r.algorithm, r.kl_coef, r.sample.batch_size * 2) == ("rebel", 0.0, 24)  # 24 images per sampling call


def test_flux_pickscore_rebel_is_flow_grpos_flux_setting_at_the_same_images():
    from configs import flux_pickscore_rebel, sd35_pickscore_rebel

    f, r = flux_pickscore_rebel.get_config(), sd35_pickscore_rebel.get_config()
    # flow_grpo's pickscore_flux (config/grpo.py): FLUX.1-dev, 6 steps, guidance embedding 3.5, 512 px, SDE at 0.9 on
    # the first 5 steps (timestep_fraction 0.99), beta 0, 128 T5 tokens; no classifier-free guidance.
    assert (f.policy, f.algorithm, f.model.pretrained, f.model.num_steps, f.model.guidance_scale, f.resolution) == (
        "flow_match", "rebel", "black-forest-labs/FLUX.1-dev", 6, 3.5, 512)
    assert (f.sample.sde, f.sample.noise_level, tuple(f.sample.sde_window), f.kl_coef, f.train.cfg) == (
        "flow_sde", 0.9, (0, 5), 0.0, False)
    assert (f.reward.name, f.mixed_precision, f.model.max_sequence_length) == ("pickscore", "bf16", 128)
    # scripts/train_flux.py: LoRA rank 64, alpha 128 on the attention and the double-stream feed-forward layers.
    assert (f.lora.rank, f.lora.alpha, len(f.lora.targets.split(","))) == (64, 128.0, 12)
    assert (f.train.learning_rate, f.train.adam_weight_decay, f.train.max_grad_norm) == (3e-4, 1e-4, 1.0)
    # The SD3.5 REBEL config's budget: 1152 images an epoch over 8 processes, two optimizer steps.
    assert (f.sample.batch_size, f.sample.num_batches_per_epoch) == (r.sample.batch_size, r.sample.num_batches_per_epoch)
    assert (f.train.batch_size, f.train.gradient_accumulation_steps) == (r.train.batch_size,
                                                                         r.train.gradient_accumulation_steps)
