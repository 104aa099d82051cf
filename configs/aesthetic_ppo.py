"""Clipped PPO on the LAION aesthetic score, LCM Dreamshaper v7 (REBEL paper, Appendix I.3.3). Needs a GPU."""

from ml_collections import ConfigDict

from configs.aesthetic_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "ppo"
    config.train.batch_size = 2
    config.train.learning_rate = 1e-4
    config.train.num_inner_epochs = 2
    config.ppo.clip_range = 1e-4
    config.ppo.adv_clip_max = 10.0
    return config
