"""Clipped PPO on the tiny LCM, on the CPU, with the REBEL quickstart's budget: 24 reward queries (one per prompt) and
3 optimizer steps per epoch."""

from ml_collections import ConfigDict

from configs.quickstart_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "ppo"
    config.sample.batch_size = 12  # x 2 batches x 1 sample = 24 reward queries per epoch
    config.train.batch_size = 8  # 24 samples = 3 optimizer steps per epoch
    config.ppo.clip_range = 1e-2
    config.ppo.adv_clip_max = 5.0
    return config
