"""Clipped PPO on the tiny LCM shipped in assets/tiny-lcm, on the CPU, with the REBEL quickstart's sampling budget."""

from ml_collections import ConfigDict

from configs.quickstart_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "ppo"
    config.train.num_inner_epochs = 2
    config.ppo.clip_range = 1e-2
    config.ppo.adv_clip_max = 5.0
    return config
