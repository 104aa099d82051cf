"""Clipped PPO on the tiny addition language model, with the REBEL text quickstart's budget per epoch: one sample per
prompt, so twice the prompts (1024 reward queries), and 4 optimizer steps of 256 samples."""

from ml_collections import ConfigDict

from configs.quickstart_text_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "ppo"
    config.sample.batch_size = 1024
    config.train.batch_size = 256
    # The usual text-RL clip range: the LCM quickstart's 1e-2 would freeze a policy over a handful of tokens.
    config.ppo.clip_range = 0.2
    config.ppo.adv_clip_max = 5.0
    return config
