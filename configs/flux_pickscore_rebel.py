"""REBEL on PickScore, FLUX.1-dev with flow_grpo's FLUX sampler (the `flow_match` policy). Needs GPUs.

flow_grpo's published `pickscore_flux` settings (config/grpo.py of yifan123/flow_grpo) where this toolkit has the same
knob: FLUX.1-dev at 512 px, 6 sampling steps, the guidance embedding at 3.5 (FLUX.1-dev is guidance-distilled: no
classifier-free guidance, one transformer call per step, hence `train.cfg = False`), their SDE at noise level 0.9
trained on the first 5 of the 6 steps (their timestep_fraction 0.99), no KL (their beta 0), bf16, and 48 prompts x 24
images = 1152 images per epoch. As in configs/sd35_pickscore_rebel.py, REBEL spends those images as pairs: 576 prompts x
2 over 8 processes, each sampling 12 prompts x 2 per batch x 6 batches and taking two optimizer steps of 36 pairs.

Not flow_grpo's, or not known: the optimizer and LoRA are configs/sd35_pickscore_grpo.py's (AdamW 3e-4, weight decay
1e-4, gradient norm 1.0, rank 32, alpha 64; flow_grpo's base config, which their FLUX config does not override, as far
as we know); T5 reads 512 tokens (FluxPipeline's default). Their faster `pickscore_flux_fast` uses `cps` at 0.8 on a
window of 3 steps in the first half instead: `sample.sde = "cps"`, `sample.noise_level = 0.8`, `sample.sde_window =
(0, 3)`. Unverified here (no GPU, no Hub); REBEL's settings are not tuned.
"""

from ml_collections import ConfigDict

from configs.sd35_pickscore_rebel import get_config as sd35_rebel_config


def get_config() -> ConfigDict:
    config = sd35_rebel_config()  # REBEL's pairs, budget, optimizer and LoRA, bf16, PickScore, the prompts
    config.model.pretrained = "black-forest-labs/FLUX.1-dev"
    config.model.num_steps = 6
    config.model.guidance_scale = 3.5  # the guidance embedding's input
    config.model.max_sequence_length = 512
    config.resolution = 512
    config.train.cfg = False  # FLUX.1-dev has no classifier-free guidance to train through
    config.sample.sde = "flow_sde"
    config.sample.noise_level = 0.9
    config.sample.sde_window = (0, 5)
    config.kl_coef = 0.0
    return config
