"""REBEL on the tiny LCM shipped in assets/tiny-lcm, on the CPU: the shape_fidelity reward fixes its weak shapes.

The five quickstart configs (quickstart_{rebel,ppo,rloo,grpo,online_dpo}.py) spend the same 24 reward queries and take
the same 3 optimizer steps per epoch, so that their curves compare per reward query, as the REBEL paper's do.
"""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "rebel"
    config.run_name = ""
    config.model.pretrained = "assets/tiny-lcm"
    config.prompt_file = "assets/quickstart_prompts.txt"
    config.resolution = 32
    config.reward.name = "shape_fidelity"
    config.num_epochs = 24
    config.save_freq = 24
    config.sample.batch_size = 6  # x 2 batches x 2 samples per prompt = 24 reward queries per epoch
    config.sample.num_batches_per_epoch = 2
    config.train.batch_size = 4  # pairs per micro-batch: 12 pairs = 3 optimizer steps per epoch
    config.train.gradient_accumulation_steps = 1
    config.train.learning_rate = 1e-3
    config.stat_tracker.buffer_size = 16
    config.stat_tracker.min_count = 4
    config.grid.num_prompts = 6
    config.grid.num_seeds = 6
    # Held-out shape accuracy: the 60 captions not trained on, at fixed seeds, before/during/after training.
    config.eval.prompt_file = "assets/shape_heldout_prompts.txt"
    config.eval.every = 8
    config.eval.num_seeds = 2
    config.eval.rewards = "shape_accuracy,shape_fidelity"
    return config
