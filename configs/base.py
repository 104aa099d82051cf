"""Every default of the trainer. Other configs start from this one; any key is overridable as `--config.a.b=value`."""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    config = ConfigDict()

    config.algorithm = "rebel"  # "rebel" or "ppo"
    config.seed = 0  # accelerate.utils.set_seed(seed, device_specific=True): each process draws its own noise
    config.num_epochs = 100
    config.logdir = "runs"
    config.run_name = ""  # default "<algorithm>_<timestamp>"; the run folder is <logdir>/<run_name>
    config.resume_from = ""  # a run folder (its latest checkpoint) or one checkpoint folder
    config.save_freq = 10  # checkpoint every this many epochs, and after the last one
    config.num_checkpoint_limit = 3  # keep this many most recent checkpoints
    config.resolution = 512  # side of the square images, in pixels
    config.mixed_precision = "no"  # "no", "fp16" or "bf16"; frozen weights in that dtype, LoRA weights in fp32
    config.log_with = "tensorboard"  # any accelerate tracker name, or "" for metrics.jsonl only
    config.prompt_file = "assets/prompts.txt"  # one prompt per line

    config.model = ConfigDict()
    config.model.pretrained = "SimianLuo/LCM_Dreamshaper_v7"  # a Hub id or a local pipeline folder
    config.model.num_steps = 8
    config.model.guidance_scale = 8.0  # through the UNet's w-embedding
    config.model.logprob_reduction = "mean"  # "mean" over latent dims (RLCM/DDPO scale) or "sum" (exact density)

    config.lora = ConfigDict()
    config.lora.rank = 8
    config.lora.alpha = 8.0
    config.lora.init = "gaussian"  # peft's init_lora_weights

    config.reward = ConfigDict()
    config.reward.name = "jpeg_compressibility"  # a registered reward or a "module:function" path
    config.reward.head_path = config_dict.placeholder(str)  # aesthetic: local sac+logos+ava1-l14-linearMSE.pth
    config.reward.clip_pretrained = "openai"  # aesthetic: open_clip tag or a local ViT-L-14 checkpoint
    config.reward.clip_model = "ViT-L-14"  # aesthetic: open_clip model name (768-d image embedding)
    config.reward.batch_size = 32  # aesthetic: images per CLIP forward

    config.sample = ConfigDict()
    config.sample.batch_size = 8  # prompts per sampling batch per process (REBEL samples each prompt twice)
    config.sample.num_batches_per_epoch = 10

    config.train = ConfigDict()
    config.train.batch_size = 1  # per process: REBEL pairs, or PPO trajectories, per micro-batch
    config.train.gradient_accumulation_steps = 8  # micro-batches per optimizer step
    config.train.learning_rate = 3e-4
    config.train.lr_schedule = "constant"  # any diffusers.optimization schedule name
    config.train.lr_warmup_steps = 0
    config.train.num_inner_epochs = 1
    config.train.max_grad_norm = 5.0
    config.train.adam_beta1 = 0.9
    config.train.adam_beta2 = 0.999
    config.train.adam_weight_decay = 1e-4
    config.train.adam_epsilon = 1e-8

    config.rebel = ConfigDict()
    config.rebel.eta = 1.0
    config.rebel.target = "advantages"  # regress onto "advantages" (per prompt), "batch_zscore" or raw "rewards"

    config.ppo = ConfigDict()
    config.ppo.clip_range = 1e-4
    config.ppo.adv_clip_max = 10.0

    config.stat_tracker = ConfigDict()
    config.stat_tracker.buffer_size = 32
    config.stat_tracker.min_count = 16

    config.grid = ConfigDict()
    config.grid.num_prompts = 4  # a sample grid of the first prompts at the start and the end of the run
    config.grid.num_seeds = 4
    config.grid.seed = 1234

    return config
