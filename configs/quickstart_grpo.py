"""GRPO on the tiny LCM, on the CPU, with the REBEL quickstart's budget: 6 prompts x 4 samples = 24 reward queries and
3 optimizer steps per epoch."""

from ml_collections import ConfigDict

from configs.quickstart_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "grpo"
    config.grpo.k = 4
    config.sample.batch_size = 3  # x 2 batches x 4 samples = 24 reward queries per epoch
    config.train.batch_size = 2  # groups per micro-batch: 6 groups = 3 optimizer steps per epoch
    config.grpo.clip_range = 1e-2
    config.grpo.adv_clip_max = 5.0
    return config
