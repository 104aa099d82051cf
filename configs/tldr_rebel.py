"""REBEL on TL;DR summarisation (REBEL paper, section 4.1 and Appendix I.1.4), Pythia 2.8B. Needs GPUs.

    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/tldr_rebel.py

512 prompts per update (8 processes x 8 prompts x 8 batches), 4 inner epochs, eta 1, kl_coef 0.05, lr 3e-6 with
linear decay, temperature 0.7, 53 new tokens, LoRA r 1024 alpha 2048 on the SFT model; the reward is the paper's
Pythia 2.8B reward model (a backbone with a scalar head), and a response without EOS gets -1 as in the REBEL code.
"""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "rebel"
    config.policy = "causal_lm"
    config.mixed_precision = "bf16"
    config.model.pretrained = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__sft__tldr"
    config.model.max_new_tokens = 53
    config.model.temperature = 0.7
    config.model.top_k = 0
    config.model.top_p = 1.0
    config.model.chat_template = False
    # The preprocessed TL;DR prompts (post + "TL;DR:") as a datasets "hub-id:split:column".
    config.prompt_file = "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144:train:query"
    config.reward.name = "reward_model"
    config.reward.reward_model_path = "vwxyzjn/EleutherAI_pythia-2.8b-deduped__reward__tldr"
    config.reward.reward_batch_size = 16
    config.reward.missing_eos_penalty = -1.0
    config.lora.rank = 1024
    config.lora.alpha = 2048.0
    config.lora.init = "gaussian"
    config.kl_coef = 0.05
    config.rebel.eta = 1.0
    config.rebel.target = "rewards"  # the paper regresses raw (KL-shaped) reward differences
    config.num_epochs = 228  # about one pass over the 117k training prompts at 512 per update
    config.save_freq = 20
    config.sample.batch_size = 8  # per process; x 8 batches x 8 processes = 512 prompts per update
    config.sample.num_batches_per_epoch = 8
    config.train.batch_size = 4  # pairs per micro-batch
    config.train.gradient_accumulation_steps = 16
    config.train.learning_rate = 3e-6
    config.train.lr_schedule = "linear"
    config.train.num_inner_epochs = 4
    config.train.max_grad_norm = 1.0
    config.grid.num_prompts = 4
    config.grid.num_seeds = 1
    return config
