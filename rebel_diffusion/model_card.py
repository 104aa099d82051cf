"""A Hugging Face Hub model card (`README.md`) for a checkpoint folder: what was trained, how, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The config keys each algorithm reads beyond the common ones.
ALGORITHM_KEYS = {
    "rebel": ("rebel.eta", "rebel.target"),
    "ppo": ("ppo.clip_range", "ppo.adv_clip_max"),
    "rloo": ("rloo.k", "rloo.clip_range"),
    "grpo": ("grpo.k", "grpo.clip_range", "grpo.adv_clip_max", "grpo.eps"),
    "online_dpo": ("dpo.beta",),
}
COMMON_KEYS = (
    "train.learning_rate", "sample.batch_size", "sample.num_batches_per_epoch", "train.batch_size",
    "train.gradient_accumulation_steps", "train.num_inner_epochs", "num_epochs", "kl_coef", "lora.rank", "lora.alpha",
    "lora.targets", "mixed_precision", "seed",
)
LCM_KEYS = ("resolution", "model.num_steps", "model.guidance_scale")
TEXT_KEYS = ("model.max_new_tokens", "model.temperature")
FLOW_KEYS = ("resolution", "model.num_steps", "model.guidance_scale", "sample.sde", "sample.noise_level",
             "sample.sde_window", "train.cfg")
DDIM_KEYS = ("resolution", "model.num_steps", "model.guidance_scale", "sample.eta", "sample.sde_window")
# The diffusers pipeline class that loads each image policy's LoRA file, and the card's tags for it. The DDIM policy
# takes SD 1.5 and SDXL, the flow policy SD3 and FLUX.1: DiffusionPipeline picks the class from the base model's
# model_index.json (for a local base folder the card names the class that file holds).
IMAGE_PIPELINES = {"lcm": ("LatentConsistencyModelPipeline", "latent-consistency-model", LCM_KEYS),
                   "flow_match": ("DiffusionPipeline", "flow-matching", FLOW_KEYS),
                   "ddim": ("DiffusionPipeline", "stable-diffusion", DDIM_KEYS)}


def _get(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _yaml_string(value: str) -> str:
    # JSON strings are valid YAML double-quoted scalars: quotes, colons and backslashes stay safe.
    return json.dumps(value)


def _local_pipeline_class(path: str) -> str | None:
    """The `_class_name` of a local pipeline folder's model_index.json; None for a Hub id or an unreadable file."""
    index = Path(path).expanduser() / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (OSError, ValueError):
        return None


def write_model_card(directory: Path, config: dict[str, Any], metrics: dict[str, Any] | None) -> Path:
    """Write `<directory>/README.md` for the checkpoint in `directory` and return its path.

    Args:
        directory: the checkpoint folder (holds the LoRA weights).
        config: the resolved training config as a dict (`config.json`).
        metrics: the last logged metrics (a `metrics.jsonl` line), or None.
    """
    directory = Path(directory)
    policy = config.get("policy", "lcm")
    is_lcm = policy in IMAGE_PIPELINES  # an image policy with a diffusers pipeline
    pipeline_class, family_tag, image_keys = IMAGE_PIPELINES.get(policy, IMAGE_PIPELINES["lcm"])
    base_model = str(_get(config, "model.pretrained"))
    if policy == "flow_match":
        pipeline_class = _local_pipeline_class(base_model) or pipeline_class
    algorithm = str(config.get("algorithm", "unknown"))
    reward = str(_get(config, "reward.name"))
    library = "diffusers" if is_lcm else "peft"
    tags = ["rebel-diffusion", "reinforcement-learning", algorithm, "lora"]
    tags += ["text-to-image", family_tag] if is_lcm else ["text-generation"]

    front = ["---"]
    # The Hub links base_model only to a Hub id; a local path would be an invalid reference.
    if base_model.count("/") == 1 and not Path(base_model).expanduser().exists():
        front.append(f"base_model: {_yaml_string(base_model)}")
    front += [f"library_name: {library}", f"pipeline_tag: {'text-to-image' if is_lcm else 'text-generation'}", "tags:"]
    front += [f"- {_yaml_string(tag)}" for tag in tags]
    front.append("---")

    keys = COMMON_KEYS + ALGORITHM_KEYS.get(algorithm, ()) + (image_keys if is_lcm else TEXT_KEYS)
    rows = [f"| `{key}` | `{_get(config, key)}` |" for key in keys if _get(config, key) is not None]
    body = [
        f"# {algorithm.upper()} fine-tune of {base_model}",
        "",
        f"A LoRA adapter trained with rebel-diffusion by **{algorithm}** to maximise the reward **{reward}**.",
        "",
        f"- Base model: `{base_model}`",
        f"- Algorithm: `{algorithm}`",
        f"- Reward: `{reward}`",
        "",
        "## Training configuration",
        "",
        "| key | value |",
        "| --- | --- |",
        *rows,
        "",
        "## Last metrics",
        "",
    ]
    if metrics:
        body += ["| metric | value |", "| --- | --- |"]
        body += [f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in metrics.items()]
    else:
        body.append("No metrics were logged.")
    body += ["", "## How to load", "", "```python"]
    if is_lcm:
        ddim = policy == "ddim"  # trained on DDIM's chain at eta: sampled the same way
        eta = f", eta={_get(config, 'sample.eta')}" if ddim else ""
        body += [
            "import torch",
            f"from diffusers import {'DDIMScheduler, ' if ddim else ''}{pipeline_class}",
            "",
            f"pipe = {pipeline_class}.from_pretrained({base_model!r})",
            *(["pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"] if ddim else []),
            "pipe.load_lora_weights(\"path/to/this/folder\")",
            *(["# trained without classifier-free guidance (train.cfg=False): SD3 samples as trained at guidance_scale=1"]
              if policy == "flow_match" and _get(config, "train.cfg") is False else []),
            f"image = pipe(\"a prompt\", num_inference_steps={_get(config, 'model.num_steps')}, "
            f"guidance_scale={_get(config, 'model.guidance_scale')}{eta}).images[0]",
        ]
    else:
        body += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({base_model!r})",
            "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")",
        ]
    body += ["```", ""]
    path = directory / "README.md"
    path.write_text("\n".join(front + [""] + body))
    return path
