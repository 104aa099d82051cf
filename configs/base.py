"""Every default of the trainer. Other configs start from this one; any key is overridable as `--config.a.b=value`."""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    config = ConfigDict()

    config.algorithm = "rebel"  # "rebel", "ppo", "rloo", "grpo" or "online_dpo"
    # "lcm" (the LCM chain), "flow_match" (an SD3-style flow-matching pipeline), "ddim" (SD 1.5 or SDXL sampled with DDIM
    # at sample.eta > 0, DDPO's setting) or "causal_lm" (a transformers causal LM)
    config.policy = "lcm"
    config.kl_coef = 0.0  # KL to the base model: shapes the reward (REBEL, RLOO, DPO) or a loss term (PPO, GRPO)
    config.kl_log_samples = 2  # at kl_coef 0 (or as a loss term), the logged `kl` is estimated on this many samples
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
    # How long a collective waits for a process that stopped without a word (killed, out of memory) before failing.
    config.collective_timeout_s = 600

    config.model = ConfigDict()
    config.model.pretrained = "SimianLuo/LCM_Dreamshaper_v7"  # a Hub id or a local pipeline folder
    config.model.num_steps = 8
    config.model.guidance_scale = 8.0  # through the UNet's w-embedding
    config.model.logprob_reduction = "mean"  # "mean" over latent dims (RLCM/DDPO scale) or "sum" (exact density)
    # flow_match: the T5 token count (the pipeline's max_sequence_length; rows of zeros when the folder has no T5)
    config.model.max_sequence_length = 256
    # causal_lm only: sampling of responses with transformers' generate
    config.model.max_new_tokens = 53
    config.model.temperature = 0.7
    config.model.top_k = 0  # 0 = off
    config.model.top_p = 1.0  # 1.0 = off
    config.model.chat_template = True  # format prompts as a user turn when the tokenizer has a chat template
    # The per-token KL of the kl_coef loss term (PPO, GRPO) and of the logged `kl` when the KL is a loss term:
    # "exact" (sum over the vocabulary of p (log p - log p_ref), tempered), "k1" (log p - log p_ref at the sampled token:
    # its expected gradient is zero) or "k3" ((r - 1) - log r, r = p_ref / p at the token, TRL's choice). Shaping the
    # reward (REBEL, RLOO, online DPO) always uses k1, the only one of them whose value as a reward carries the gradient.
    config.model.kl_estimator = "exact"

    config.lora = ConfigDict()
    config.lora.rank = 8
    config.lora.alpha = 8.0
    # peft's init_lora_weights. Text: "gaussian", "default" (peft's True), "orthogonal" (even rank) or "false" (random B,
    # starts away from the base model); inits that rewrite the base weights (pissa, olora, ...) would move the reference.
    config.lora.init = "gaussian"
    config.lora.targets = ""  # comma-separated module names; "" = the policy's default (LCM: the attention projections)

    config.reward = ConfigDict()
    config.reward.name = "jpeg_compressibility"  # a registered reward, a "module:function" path or a server's URL
    # A weighted reward's components into targets: "sum" (the algorithm's targets of the weighted total) or "advantage"
    # (the weighted sum of each component's own targets, each normalised first; rebel_diffusion.algorithms.aggregate).
    config.reward.aggregate = "sum"
    config.reward.head_path = config_dict.placeholder(str)  # aesthetic: local sac+logos+ava1-l14-linearMSE.pth
    config.reward.clip_pretrained = "openai"  # aesthetic: open_clip tag or a local ViT-L-14 checkpoint
    config.reward.clip_model = "ViT-L-14"  # aesthetic: open_clip model name (768-d image embedding)
    config.reward.batch_size = 32  # aesthetic: images per CLIP forward; a reward server: outputs per request
    # A reward server (reward.name = "http://host:port"): requests in flight at once, seconds to wait for an answer,
    # and retries of a request that got none (or an HTTP 5xx), after 0.5 s, 1 s, 2 s, ...
    config.reward.max_concurrency = 4
    config.reward.timeout_s = 60.0
    config.reward.retries = 3
    config.reward.reward_model_path = ""  # reward_model: a local folder or a Hub id (owner/name)
    config.reward.reward_batch_size = 8  # reward_model: texts per reward-model forward
    config.reward.missing_eos_penalty = config_dict.placeholder(float)  # text: the reward of a response without EOS
    # reward.name = "judge": a model on an OpenAI-compatible server (vLLM, sglang, llama.cpp) scores each output, asked
    # with reward.max_concurrency, reward.timeout_s and reward.retries as a reward server is.
    config.reward.judge = ConfigDict()
    config.reward.judge.base_url = ""  # http://host:port/v1; GET /models must list the model before sampling starts
    config.reward.judge.model = ""
    config.reward.judge.template = ""  # the user message: {prompt}, and {response} for text (an image is attached)
    config.reward.judge.system = ""  # a system message, when not empty
    config.reward.judge.score = "number"  # "number" (read from the reply) or "yes_prob" (P(yes) from the log-probs)
    config.reward.judge.pattern = ""  # number: a regex whose first group (or match) is the score; "" = the first number
    config.reward.judge.score_min = config_dict.placeholder(float)  # number: with score_max, mapped to [0, 1]
    config.reward.judge.score_max = config_dict.placeholder(float)
    config.reward.judge.max_tokens = 16  # of the reply (yes_prob asks for one token)
    config.reward.judge.temperature = 0.0
    config.reward.judge.top_logprobs = 20  # yes_prob: top tokens searched for "yes" and "no"
    config.reward.judge.api_key_env = ""  # the environment variable holding an API key (the key is never in a config)

    # A pairwise preference P(a beats b | prompt) (rebel_diffusion/rewards/preference.py): what algorithm
    # "rebel_preference" learns from, and the judge of `python -m rebel_diffusion.sample --compare-base --preference`
    # (the run's section gives its options). Each preference factory receives the options its signature names; a nested
    # section (the judge's `preference.judge`) as a dict.
    config.preference = ConfigDict()
    config.preference.name = ""  # "" = none; pickscore, hpsv2, bradley_terry, judge, a "module:function" or a URL
    config.preference.reward = ""  # bradley_terry: the reward spec r of sigmoid((r_a - r_b) / temperature)
    config.preference.temperature = 1.0  # bradley_terry
    config.preference.batch_size = 16  # pickscore, hpsv2: images per CLIP forward; a server: pairs per request
    config.preference.max_concurrency = 4  # a preference server: requests in flight, seconds to wait, retries
    config.preference.timeout_s = 60.0
    config.preference.retries = 3

    config.sample = ConfigDict()
    config.sample.batch_size = 8  # prompts per sampling batch per process; each is sampled k times (a group)
    config.sample.num_batches_per_epoch = 10
    config.sample.decode_batch_size = 4  # images per VAE decode call: bounds decoder memory at 768 px
    config.sample.overlap_reward = True  # score batch i in a worker thread while batch i+1 samples (same results)
    # flow_match only: the dynamics that turn the flow ODE into a policy: "flow_sde" (Flow-GRPO's SDE), "cps"
    # (coefficients-preserving sampling) or "ode" (diffusers' Euler step: the pipeline's images, nothing to train).
    config.sample.sde = "flow_sde"
    config.sample.noise_level = 0.7  # flow_match: the SDE's noise level a (> 0; below 1 for cps)
    # flow_match and ddim: (first stochastic step, count); the other steps are ODE steps (ddim: eta = 0), not trained.
    # () = every step that carries noise (flow_sde and ddim: all; cps: all but the last, whose std sigma_next sin(a pi/2)
    # is 0). DDPO's train.timestep_fraction f is about (0, int(f * model.num_steps)) here (a fixed window, not a random
    # subset of each trajectory's steps).
    config.sample.sde_window = ()
    config.sample.eta = 1.0  # ddim only: DDIM's noise scale in (0, 1] (1: DDPM's posterior variance, DDPO's default)

    config.train = ConfigDict()
    config.train.batch_size = 1  # per process: groups (REBEL/DPO pairs, PPO samples, RLOO/GRPO groups) per micro-batch
    config.train.gradient_accumulation_steps = 8  # micro-batches per optimizer step
    config.train.learning_rate = 3e-4
    config.train.lr_schedule = "constant"  # any diffusers.optimization schedule name
    config.train.lr_warmup_steps = 0
    config.train.num_inner_epochs = 1
    config.train.gradient_checkpointing = False  # recompute UNet activations in backward: less memory, more time
    # flow_match (SD3): classifier-free guidance in sampling and training; False runs the conditional branch only
    # (flow_grpo's "no cfg": half the transformer calls, the log-probs those of the unguided policy). FLUX has no CFG.
    config.train.cfg = True
    config.train.max_grad_norm = 5.0
    config.train.adam_beta1 = 0.9
    config.train.adam_beta2 = 0.999
    config.train.adam_weight_decay = 1e-4
    config.train.adam_epsilon = 1e-8

    config.rebel = ConfigDict()
    config.rebel.eta = 1.0
    config.rebel.target = "advantages"  # regress onto "advantages" (per prompt), "batch_zscore" or raw "rewards"
    # Where y' of each pair comes from (the paper's mu): "policy" (pi_t), "base" (the base model, adapter disabled),
    # "offline" (responses of rebel.offline_data; text policies) or "mix" (each pair draws its source from rebel.mix).
    config.rebel.mu = "policy"
    config.rebel.mix = ConfigDict({"policy": 0.5, "base": 0.0, "offline": 0.5})
    config.rebel.offline_data = ""  # a .jsonl of prompt/response, or a dataset "hub-id:split:prompt_col:response_col"

    config.ppo = ConfigDict()
    config.ppo.clip_range = 1e-4
    config.ppo.adv_clip_max = 10.0

    config.rloo = ConfigDict()
    config.rloo.k = 4  # samples per prompt
    config.rloo.clip_range = 0.2  # the clipped importance ratio pi / pi_old, used at every optimizer step

    config.grpo = ConfigDict()
    config.grpo.k = 4  # samples per prompt
    config.grpo.clip_range = 1e-4
    config.grpo.adv_clip_max = 5.0
    config.grpo.eps = 1e-4  # (r - mean) / (std + eps) within each group

    config.dpo = ConfigDict()
    config.dpo.beta = 0.1  # online DPO's temperature

    config.stat_tracker = ConfigDict()
    config.stat_tracker.buffer_size = 32
    config.stat_tracker.min_count = 16

    config.grid = ConfigDict()
    config.grid.num_prompts = 4  # a sample grid of the first prompts at the start and the end of the run
    config.grid.num_seeds = 4
    config.grid.seed = 1234

    config.eval = ConfigDict()
    config.eval.prompt_file = ""  # held-out prompts; "" turns evaluation off
    config.eval.every = 4  # epochs between evaluations (also before the first epoch and after the last)
    config.eval.num_seeds = 2  # fixed seeds per prompt
    config.eval.seed = 100000  # the first seed; far from the grid's, never used by training's own RNG
    config.eval.rewards = ""  # comma-separated rewards to score, each logged as eval_<name>; "" = the training reward

    return config
