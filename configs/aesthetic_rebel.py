"""REBEL on the LAION aesthetic score, LCM Dreamshaper v7 (REBEL paper, Appendix I.3.3). Needs a GPU."""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "rebel"
    config.resolution = 768
    config.mixed_precision = "bf16"
    config.prompt_file = "assets/prompts.txt"
    config.reward.name = "aesthetic"
    config.num_epochs = 100
    config.save_freq = 10
    config.sample.batch_size = 8
    config.sample.num_batches_per_epoch = 10
    config.train.batch_size = 1
    config.train.gradient_accumulation_steps = 8
    config.train.learning_rate = 3e-4
    config.train.num_inner_epochs = 1
    config.train.max_grad_norm = 5.0
    config.rebel.eta = 1.0
    config.stat_tracker.buffer_size = 32
    config.stat_tracker.min_count = 16
    return config
