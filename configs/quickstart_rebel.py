"""REBEL on the tiny LCM shipped in assets/tiny-lcm, on the CPU: JPEG compressibility rises within minutes."""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "rebel"
    config.run_name = ""
    config.model.pretrained = "assets/tiny-lcm"
    config.prompt_file = "assets/quickstart_prompts.txt"
    config.resolution = 32
    config.reward.name = "jpeg_compressibility"
    config.num_epochs = 16
    config.save_freq = 16
    config.sample.batch_size = 12
    config.sample.num_batches_per_epoch = 2
    config.train.batch_size = 4
    config.train.gradient_accumulation_steps = 1
    config.train.learning_rate = 3e-3
    config.stat_tracker.buffer_size = 16
    config.stat_tracker.min_count = 4
    config.grid.num_prompts = 6
    config.grid.num_seeds = 6
    return config
