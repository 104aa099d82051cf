"""GRPO on the tiny addition language model, with the REBEL text quickstart's budget per epoch: grpo.k=4 samples per
prompt, so half the prompts (1024 reward queries), and 4 optimizer steps of 64 groups."""

from ml_collections import ConfigDict

from configs.quickstart_text_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "grpo"
    config.grpo.k = 4
    config.sample.batch_size = 256
    config.train.batch_size = 64
    # The usual text-RL clip range: the default 1e-4 (sized for diffusion steps) would freeze the policy.
    config.grpo.clip_range = 0.2
    return config
