"""REBEL on PickScore, FLUX.1-dev with flow_grpo's FLUX sampler (the `flow_match` policy). Needs GPUs.

flow_grpo's published `pickscore_flux` settings (config/grpo.py, config/base.py and scripts/train_flux.py of
yifan123/flow_grpo) where this toolkit has the same knob: FLUX.1-dev at 512 px, 6 sampling steps, the guidance
embedding at 3.5 (FLUX.1-dev is guidance-distilled: no classifier-free guidance, one transformer call per step, hence
`train.cfg = False`), their SDE at noise level 0.9 trained on the first 5 of the 6 steps (int(6 x timestep_fraction
0.99)), 128 T5 tokens, no KL (their beta 0), bf16, AdamW at 3e-4 with weight decay 1e-4 and gradient norm 1.0, and LoRA
rank 64, alpha 128 on the attention projections and the double-stream blocks' feed-forward layers. They sample 48
prompts x 24 images = 1152 images an epoch; as configs/sd35_pickscore_rebel.py does for SD3.5, REBEL spends those
images as pairs: 576 prompts x 2 over 8 processes, each sampling 12 prompts x 2 per batch x 6 batches and taking two
optimizer steps of 36 pairs.

Where this differs: pairs instead of groups (no clip range), no EMA of the LoRA weights, the VAE decodes in bf16
(theirs in fp32), gradient checkpointing. Their faster `pickscore_flux_fast` uses `cps` at 0.8 on a window of 3 steps
in the first half (steps 0-2): `sample.sde = "cps"`, `sample.noise_level = 0.8`, `sample.sde_window = (0, 3)`.
Unverified here (no GPU, no Hub: FLUX.1-dev has not been loaded by this code, only a tiny random FluxPipeline); REBEL's
settings are not tuned.
"""

from ml_collections import ConfigDict

from configs.sd35_pickscore_rebel import get_config as sd35_rebel_config

# flow_grpo's LoRA targets for FLUX (scripts/train_flux.py); peft matches them as suffixes, so the single-stream
# blocks' attn.to_q/k/v are adapted too.
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")


def get_config() -> ConfigDict:
    config = sd35_rebel_config()  # REBEL's pairs and budget, the optimizer, bf16, PickScore, the prompts
    config.model.pretrained = "black-forest-labs/FLUX.1-dev"
    config.model.num_steps = 6
    config.model.guidance_scale = 3.5  # the guidance embedding's input
    config.model.max_sequence_length = 128
    config.resolution = 512
    config.train.cfg = False  # FLUX.1-dev has no classifier-free guidance to train through
    config.sample.sde = "flow_sde"
    config.sample.noise_level = 0.9
    config.sample.sde_window = (0, 5)
    config.kl_coef = 0.0
    config.lora.rank = 64
    config.lora.alpha = 128.0
    config.lora.targets = ",".join(FLUX_LORA_TARGETS)
    return config
