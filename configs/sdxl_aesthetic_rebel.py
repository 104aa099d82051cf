"""REBEL on the LAION aesthetic score, SDXL base 1.0 sampled with DDIM at eta = 1 (the `ddim` policy). Needs a GPU.

Our settings, not a paper's and not tuned: SDXL's default guidance (5.0) at its native 1024 px, 20 DDIM steps of which
the first 10 are actions (the steps that lay out the image; the last 10 are eta = 0 steps, not trained), so an update
costs 10 UNet forward+backward passes per trajectory. bf16 frozen weights with fp32 LoRA (SDXL's VAE is safe in bf16,
it overflows only in fp16), gradient checkpointing and one image per VAE decode to fit a 80 GB GPU. Per process: 4
prompts x 2 samples (REBEL's pairs) x 8 batches = 64 images an epoch, 4 optimizer steps of 8 pairs.
"""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "rebel"
    config.policy = "ddim"
    config.model.pretrained = "stabilityai/stable-diffusion-xl-base-1.0"
    config.model.num_steps = 20
    config.model.guidance_scale = 5.0
    config.sample.eta = 1.0
    config.sample.sde_window = (0, 10)
    config.resolution = 1024
    config.mixed_precision = "bf16"
    config.prompt_file = "assets/prompts.txt"
    config.reward.name = "aesthetic"
    config.num_epochs = 100
    config.save_freq = 10
    config.lora.rank = 16
    config.lora.alpha = 16.0
    config.sample.batch_size = 4
    config.sample.num_batches_per_epoch = 8
    config.sample.decode_batch_size = 1
    config.train.batch_size = 1
    config.train.gradient_accumulation_steps = 8
    config.train.gradient_checkpointing = True
    config.train.learning_rate = 3e-4
    config.rebel.eta = 1.0
    return config
