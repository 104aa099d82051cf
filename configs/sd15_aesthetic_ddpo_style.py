"""DDPO's aesthetic setting (Black et al. 2023), as we read `ddpo-pytorch`'s `config/dgx.py:aesthetic`, on SD 1.5 with
our keys: PPO with clip 1e-4 and advantages clipped at 5, DDIM at eta = 1 with 50 steps, guidance 5.0, 512 px, LoRA
rank 4, lr 3e-4, per-prompt reward normalisation (buffer 32, min count 16), fp16. Needs a GPU.

What differs: the batch sizes here are per process (DDPO's 8 GPUs sampled 8 x 4 x 8 = 256 images an epoch; this config
samples 32 per process, 4 optimizer steps of 8), and DDPO's `timestep_fraction` trains a random subset of each
trajectory's steps where `sample.sde_window` is a fixed range (here every step, DDPO's fraction 1.0).
"""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "ppo"
    config.policy = "ddim"
    config.model.pretrained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    config.model.num_steps = 50
    config.model.guidance_scale = 5.0
    config.sample.eta = 1.0
    config.resolution = 512
    config.mixed_precision = "fp16"
    config.prompt_file = "assets/prompts.txt"
    config.reward.name = "aesthetic"
    config.num_epochs = 200
    config.lora.rank = 4
    config.lora.alpha = 4.0
    config.sample.batch_size = 8
    config.sample.num_batches_per_epoch = 4
    config.train.batch_size = 4
    config.train.gradient_accumulation_steps = 2
    config.train.learning_rate = 3e-4
    config.train.num_inner_epochs = 1
    config.ppo.clip_range = 1e-4
    config.ppo.adv_clip_max = 5.0
    return config
