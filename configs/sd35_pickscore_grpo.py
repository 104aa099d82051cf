"""GRPO on PickScore, Stable Diffusion 3.5 Medium with flow_grpo's SDE (the `flow_match` policy). Needs GPUs.

flow_grpo's published `pickscore_sd3` settings (config/grpo.py and config/base.py of yifan123/flow_grpo) where this
toolkit has the same knob: 10 sampling steps at guidance 4.5 and 512 px; the SDE at noise level 0.7, trained on the
first 9 of the 10 steps (their timestep_fraction 0.99); groups of 24 images per prompt and 48 prompts per epoch over
the processes; clip range 1e-4, advantages clipped at 5, KL loss coefficient (their beta) 0.01; AdamW at 3e-4 with
weight decay 1e-4 and gradient norm 1.0; LoRA rank 32, alpha 64 on the attention projections; two optimizer steps an
epoch.

Where they differ: the advantage is normalised by each group's std (theirs by the whole batch's, global_std); no EMA
of the LoRA weights for evaluation; bf16 (their base config's fp16 is prone to overflow in SD3's text encoders); a
micro-batch is a whole group of 24 images (theirs 9), with gradient checkpointing to fit it. The prompts are ours
(assets/prompts.txt); theirs are Pick-a-Pic's, which `prompt_file` can name. Written for 8 processes: 6 prompts per
process per epoch; with P processes set sample.num_batches_per_epoch = 48 / P.
"""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "grpo"
    config.policy = "flow_match"
    config.model.pretrained = "stabilityai/stable-diffusion-3.5-medium"
    config.model.num_steps = 10
    config.model.guidance_scale = 4.5
    config.resolution = 512
    config.mixed_precision = "bf16"
    config.sample.sde = "flow_sde"
    config.sample.noise_level = 0.7
    config.sample.sde_window = (0, 9)
    config.prompt_file = "assets/prompts.txt"
    config.reward.name = "pickscore"
    config.lora.rank = 32
    config.lora.alpha = 64.0
    config.grpo.k = 24
    config.grpo.clip_range = 1e-4
    config.grpo.adv_clip_max = 5.0
    config.kl_coef = 0.01
    config.sample.batch_size = 1  # one prompt: its 24 images in one sampling call
    config.sample.num_batches_per_epoch = 6
    config.sample.decode_batch_size = 4
    config.train.batch_size = 1
    config.train.gradient_accumulation_steps = 3  # 6 groups per process: two optimizer steps an epoch
    config.train.gradient_checkpointing = True
    config.train.learning_rate = 3e-4
    config.train.adam_weight_decay = 1e-4
    config.train.max_grad_norm = 1.0
    config.num_epochs = 1000
    config.save_freq = 60
    return config
