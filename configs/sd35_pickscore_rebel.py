"""REBEL on PickScore, Stable Diffusion 3.5 Medium with flow_grpo's SDE (the `flow_match` policy). Needs GPUs.

The sampler, model and optimizer are configs/sd35_pickscore_grpo.py's (flow_grpo's published settings); what REBEL
needs of its own: pairs instead of groups of 24, at the same images per epoch. The GRPO config samples 48 prompts x 24
images = 1152 images an epoch over 8 processes; here 576 prompts x 2. Each process samples 12 prompts x 2 per batch
(the same 24 images per sampling call) x 6 batches, and takes two optimizer steps of 36 pairs. REBEL regresses on
per-prompt z-scored PickScores at eta 1, whose mirror-descent step already keeps the update near pi_t, so no KL term
(kl_coef 0); not tuned.
"""

from ml_collections import ConfigDict

from configs.sd35_pickscore_grpo import get_config as grpo_config


def get_config() -> ConfigDict:
    config = grpo_config()
    config.algorithm = "rebel"
    config.kl_coef = 0.0
    config.rebel.eta = 1.0
    config.rebel.target = "advantages"
    config.sample.batch_size = 12
    config.sample.num_batches_per_epoch = 6
    config.train.batch_size = 4  # pairs per micro-batch
    config.train.gradient_accumulation_steps = 9  # 72 pairs per process: two optimizer steps an epoch
    return config
