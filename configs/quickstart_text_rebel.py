"""REBEL on the tiny addition language model shipped in assets/tiny-lm, on the CPU: "17+25=" -> "42", reward 1 for an
exact answer. The success rate on training and on held-out prompts rises within minutes."""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "rebel"
    config.policy = "causal_lm"
    config.model.pretrained = "assets/tiny-lm"
    config.model.max_new_tokens = 4
    config.model.temperature = 0.7
    config.model.chat_template = False
    config.prompt_file = "assets/addition_train_prompts.txt"
    config.reward.name = "addition_exact"
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.init = "gaussian"
    config.num_epochs = 30
    config.save_freq = 30
    # 128 prompts x 2 samples = 256 reward queries and 4 optimizer steps of 32 pairs per epoch: with 8 pairs per step
    # the gradient was mostly prompt-specific noise, and a learning rate of 1e-3 made the regression loss grow.
    config.sample.batch_size = 128
    config.sample.num_batches_per_epoch = 1
    config.train.batch_size = 32
    config.train.gradient_accumulation_steps = 1
    config.train.learning_rate = 3e-4
    config.train.num_inner_epochs = 1
    config.rebel.eta = 1.0
    # Most of the 8000 prompts are drawn once or twice, so per-prompt statistics never build up; with k=2 the raw 0/1
    # rewards give each pair a target difference of -1, 0 or 1.
    config.rebel.target = "rewards"
    config.stat_tracker.buffer_size = 16
    config.stat_tracker.min_count = 4
    config.grid.num_prompts = 8
    config.grid.num_seeds = 2
    config.eval.prompt_file = "assets/addition_heldout_prompts.txt"
    config.eval.every = 5
    config.eval.num_seeds = 2
    return config
