"""REBEL for general chat (REBEL paper, section 4.2 and Appendix I.2.3, setup 2): Llama-3-8B-Instruct with the
FsfairX-LLaMA3-RM-v0.1 reward model on UltraFeedback prompts. Needs GPUs; an 8B policy and an 8B reward model do not
fit one 80 GB GPU with full-weight training, so launch with an FSDP or DeepSpeed accelerate config (see README).

Deviation from the paper: it trains the last four transformer layers; here a LoRA adapter on every linear layer trains
(rank 64), which keeps the adapter-disabled model as the KL reference without a second copy.
"""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def get_config() -> ConfigDict:
    config = base_config()
    config.algorithm = "rebel"
    config.policy = "causal_lm"
    config.mixed_precision = "bf16"
    config.model.pretrained = "meta-llama/Meta-Llama-3-8B-Instruct"
    config.model.max_new_tokens = 1024
    config.model.temperature = 0.7
    config.model.chat_template = True
    config.prompt_file = "openbmb/UltraFeedback:train:instruction"
    config.reward.name = "reward_model"
    config.reward.reward_model_path = "sfairXC/FsfairX-LLaMA3-RM-v0.1"
    config.reward.reward_batch_size = 4
    config.lora.rank = 64
    config.lora.alpha = 128.0
    config.kl_coef = 0.05
    config.rebel.eta = 1.0
    config.rebel.target = "rewards"  # raw reward-model scores, without normalisation, as the paper
    config.num_epochs = 250  # 64k prompts at 32 per update, about one pass
    config.save_freq = 25
    config.sample.batch_size = 4  # per process; x 1 batch x 8 processes = 32 prompts per update
    config.sample.num_batches_per_epoch = 1
    config.train.batch_size = 1
    config.train.gradient_accumulation_steps = 4
    config.train.learning_rate = 1e-7
    config.train.lr_schedule = "linear"
    config.train.num_inner_epochs = 4
    config.train.max_grad_norm = 1.0
    config.grid.num_prompts = 2
    config.grid.num_seeds = 1
    return config
