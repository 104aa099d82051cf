"""The training loop: sample trajectories, score them, turn rewards into targets, update the LoRA policy.

One epoch reads top to bottom in `train`: sampling, reward statistics across processes, then `num_inner_epochs`
passes of shuffled micro-batches with REBEL's regression or PPO's clipped surrogate. accelerate handles processes,
mixed precision, gradient accumulation and checkpoint state.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from rebel_diffusion.algorithms import PerPromptStatTracker, ppo_loss, rebel_loss, regression_targets
from rebel_diffusion.plots import save_image_grid, save_learning_curve
from rebel_diffusion.policies.lcm import LCMPolicy
from rebel_diffusion.rewards import RewardSetupError, check_reward_name, make_reward_fn
from rebel_diffusion.trajectory import Trajectory

ALGORITHMS = ("rebel", "ppo")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_FILE = "checkpoint.json"


class ConfigError(ValueError):
    """A problem with the user's input, reported as one line before any compute is spent."""


class NonFiniteError(RuntimeError):
    """A reward or a gradient came back NaN or infinite; the run stops with its last checkpoint intact."""


class TrainingProgress:
    """Where the run is, saved with accelerate's state so that a resumed run continues exactly."""

    def __init__(self) -> None:
        self.epoch = 0
        self.reward_queries = 0
        self.optimizer_steps = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompt file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"prompt_file {str(path)!r} does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt_file {str(path)!r} holds no prompts")
    return prompts


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's finished checkpoints, oldest first (not the `.tmp`/`.old` folders of an interrupted write)."""
    folders = (run_dir / "checkpoints").glob("epoch_*")
    return sorted(p for p in folders if re.fullmatch(r"epoch_\d+", p.name) and (p / CHECKPOINT_FILE).is_file())


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder itself, or the latest complete checkpoint in a run folder."""
    path = Path(path)
    if (path / CHECKPOINT_FILE).is_file():
        return path
    complete = complete_checkpoints(path)
    if not complete:
        raise ConfigError(f"resume_from {str(path)!r} is neither a checkpoint nor a run folder with checkpoints")
    return complete[-1]


def validate_config(config: ConfigDict) -> list[str]:
    """Check everything that can be checked before loading a model; return the prompts."""
    if config.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {config.algorithm!r}; choose one of {list(ALGORITHMS)}")
    try:
        check_reward_name(config.reward.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.mixed_precision not in DTYPES:
        raise ConfigError(f"mixed_precision must be one of {list(DTYPES)}, got {config.mixed_precision!r}")
    if config.model.logprob_reduction not in ("mean", "sum"):
        raise ConfigError(f"model.logprob_reduction must be 'mean' or 'sum', got {config.model.logprob_reduction!r}")
    if config.rebel.target not in ("advantages", "batch_zscore", "rewards"):
        raise ConfigError(f"rebel.target must be 'advantages', 'batch_zscore' or 'rewards', got {config.rebel.target!r}")
    pretrained = str(config.model.pretrained)
    if not Path(pretrained).expanduser().exists() and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1):
        raise ConfigError(f"model.pretrained {pretrained!r} is neither an existing folder nor a Hub id (owner/name)")
    for key in ("num_epochs", "save_freq", "num_checkpoint_limit", "sample.batch_size", "sample.num_batches_per_epoch", "train.batch_size",
                "train.gradient_accumulation_steps", "train.num_inner_epochs", "resolution"):
        value = config
        for part in key.split("."):
            value = value[part]
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    micro_batches = config.sample.batch_size * config.sample.num_batches_per_epoch / config.train.batch_size
    if micro_batches != int(micro_batches) or int(micro_batches) % config.train.gradient_accumulation_steps:
        raise ConfigError(
            "sample.batch_size * sample.num_batches_per_epoch must be a multiple of "
            "train.batch_size * train.gradient_accumulation_steps, so that every optimizer step sees whole micro-batches"
        )
    if config.resume_from:
        find_checkpoint(config.resume_from)
    return read_prompts(config.prompt_file)


def _run_dir(config: ConfigDict, checkpoint: Path | None) -> Path:
    """<logdir>/<run_name>; a resumed run without a run_name continues in its own folder."""
    name = config.run_name
    if not name and checkpoint is not None:
        return checkpoint.parent.parent
    if not name:
        stamp = [datetime.datetime.now().strftime("%Y%m%d_%H%M%S")]
        broadcast_object_list(stamp)  # every process must agree on the folder
        name = f"{config.algorithm}_{stamp[0]}"
    return Path(config.logdir) / name


def _lora_hooks(accelerator: Accelerator, policy: LCMPolicy) -> None:
    """Checkpoint only the LoRA weights, in diffusers' format, instead of the whole UNet."""

    def save(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            policy.save_lora(output_dir)

    def load(models: list, input_dir: str) -> None:
        models.clear()
        policy.load_lora(input_dir)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, progress: TrainingProgress, keep: int) -> Path:
    """Write the full training state to `checkpoints/epoch_NNNN` atomically: into a temporary folder, then renamed.

    A crash while writing leaves only the temporary folder behind; earlier checkpoints stay intact.
    """
    final = run_dir / "checkpoints" / f"epoch_{progress.epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(progress.state_dict()))
        if final.exists():
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def _flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar}, the shape TensorBoard's hparams accept."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(metrics) + "\n")


def _truncate_metrics(path: Path, first_epoch: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the file holds each epoch once."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < first_epoch]
        path.write_text("".join(line + "\n" for line in lines))


@torch.no_grad()
def _sample_grid(policy: LCMPolicy, prompts: list[str], config: ConfigDict, path: Path, is_main: bool) -> None:
    """Samples of fixed prompts and seeds, rows = prompts, columns = seeds (every process samples, main saves)."""
    columns = [
        policy.sample(prompts, generator=torch.Generator().manual_seed(config.grid.seed + j)).outputs
        for j in range(config.grid.num_seeds)
    ]
    if is_main:
        save_image_grid(torch.stack(columns, dim=1), prompts, path)


def train(config: ConfigDict) -> Path:
    """Run (or resume) one training run; returns its folder."""
    prompt_pool = validate_config(config)
    rebel = config.algorithm == "rebel"
    last_checkpoint = find_checkpoint(config.resume_from) if config.resume_from else None
    # The processes agree on the run folder first: trackers write to <project_dir>/<run_name>.
    PartialState(cpu=not torch.cuda.is_available())
    run_dir = _run_dir(config, last_checkpoint)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=config.log_with or None,
        project_dir=str(run_dir.parent),
    )
    metrics_path = run_dir / "metrics.jsonl"
    if not config.resume_from and metrics_path.exists():
        raise ConfigError(f"run folder {str(run_dir)!r} already holds a run; resume it with "
                          f"--config.resume_from={run_dir} or choose another run_name")
    is_main = accelerator.is_main_process
    set_seed(config.seed, device_specific=True)

    dtype = DTYPES[config.mixed_precision]
    # The reward first: a bad head path fails before a multi-GB model download.
    reward_options = {k: v for k, v in config.reward.items() if k != "name"}
    try:
        reward_fn = make_reward_fn(config.reward.name, device=accelerator.device, dtype=dtype, **reward_options)
    except RewardSetupError as e:
        raise ConfigError(f"reward {config.reward.name!r}: {e}") from None
    try:
        policy = LCMPolicy.from_pretrained(
            config.model.pretrained, device=accelerator.device, dtype=dtype,
            num_steps=config.model.num_steps, guidance_scale=config.model.guidance_scale,
            resolution=config.resolution, logprob_reduction=config.model.logprob_reduction,
            lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, lora_init=config.lora.init,
        )
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    num_actions = policy.num_actions

    pairs_or_samples = config.sample.batch_size * config.sample.num_batches_per_epoch
    steps_per_epoch = pairs_or_samples // config.train.batch_size // config.train.gradient_accumulation_steps
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(), lr=config.train.learning_rate,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        weight_decay=config.train.adam_weight_decay, eps=config.train.adam_epsilon,
    )
    # accelerate steps a prepared scheduler once per process at every optimizer step: count in those units.
    lr_scheduler = get_scheduler(
        config.train.lr_schedule, optimizer, num_warmup_steps=config.train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=steps_per_epoch * config.train.num_inner_epochs * config.num_epochs * accelerator.num_processes,
    )
    policy.unet, optimizer, lr_scheduler = accelerator.prepare(policy.unet, optimizer, lr_scheduler)
    stat_tracker = PerPromptStatTracker(config.stat_tracker.buffer_size, config.stat_tracker.min_count)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(stat_tracker, progress)
    _lora_hooks(accelerator, policy)
    if last_checkpoint is not None:
        accelerator.load_state(str(last_checkpoint))

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, progress.epoch)
        (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2))
    accelerator.init_trackers(run_dir.name, config=_flat_hparams(config.to_dict()))
    grid_prompts = list(dict.fromkeys(prompt_pool))[: config.grid.num_prompts]
    if progress.epoch == 0 and config.grid.num_prompts > 0:
        _sample_grid(policy, grid_prompts, config, run_dir / "grid_first.png", is_main)

    for epoch in range(progress.epoch, config.num_epochs):
        start = time.time()

        # Sampling: REBEL draws two independent trajectories per prompt, kept as aligned halves `a` and `b`.
        policy.unet.eval()
        batches = []
        for _ in tqdm(range(config.sample.num_batches_per_epoch), desc=f"epoch {epoch}: sampling", disable=not is_main):
            prompts = random.choices(prompt_pool, k=config.sample.batch_size)
            trajectory = policy.sample(prompts + prompts if rebel else prompts)
            trajectory.rewards = reward_fn(trajectory.outputs, trajectory.prompts).float().to(accelerator.device)
            trajectory.outputs = None  # images are not needed past the reward; free their memory
            batches.append(trajectory)
        half = config.sample.batch_size
        if rebel:
            samples = Trajectory.cat([t[:half] for t in batches] + [t[half:] for t in batches])
        else:
            samples = Trajectory.cat(batches)

        # Rewards of all processes feed one stat tracker, identical on every process; each keeps its own slice.
        all_rewards = accelerator.gather(samples.rewards).cpu().numpy()
        all_prompts = gather_object(samples.prompts)
        bad = np.flatnonzero(~np.isfinite(all_rewards))
        if bad.size:
            kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
            raise NonFiniteError(
                f"epoch {epoch}: reward {all_rewards[bad[0]]} for prompt {all_prompts[bad[0]]!r}; stopped, {kept}"
            )
        advantages = stat_tracker.update(all_prompts, all_rewards)
        if rebel:
            advantages = regression_targets(all_rewards, advantages, config.rebel.target)
        local = torch.as_tensor(advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index],
                                dtype=torch.float32, device=accelerator.device)
        progress.reward_queries += len(all_rewards)

        # Training: shuffled micro-batches; one autograd graph per chain step at a time.
        policy.unet.train()
        info = defaultdict(list)
        num_units = len(samples) // 2 if rebel else len(samples)
        for inner_epoch in range(config.train.num_inner_epochs):
            order = torch.randperm(num_units)
            for first in tqdm(range(0, num_units, config.train.batch_size), desc=f"epoch {epoch}.{inner_epoch}: training",
                              disable=not is_main):
                index = order[first : first + config.train.batch_size]
                if rebel:
                    index = torch.cat([index, index + num_units])  # the pairs' `a` halves, then their `b` halves
                batch, target = samples[index], local[index]
                with accelerator.accumulate(policy.unet):
                    if rebel:
                        pairs = len(index) // 2
                        with torch.no_grad():
                            current = torch.stack([policy.log_prob(batch, s) for s in range(num_actions)], dim=1)
                        log_ratio = batch.masked_sum(current - batch.log_probs)
                        for s in range(num_actions):
                            log_prob = policy.log_prob(batch, s)
                            # The value is the full sum over steps, the gradient flows through step s only: the T
                            # backward passes add up to the exact gradient of the regression loss.
                            step_ratio = log_ratio + (log_prob - log_prob.detach())
                            loss = rebel_loss(step_ratio[:pairs], step_ratio[pairs:], target[:pairs], target[pairs:],
                                              config.rebel.eta)
                            accelerator.backward(loss)
                        info["loss"].append(loss.detach())
                    else:
                        for s in range(num_actions):
                            log_ratio = policy.log_prob(batch, s) - batch.log_probs[:, s]
                            loss, stats = ppo_loss(log_ratio, target, config.ppo.clip_range, config.ppo.adv_clip_max)
                            accelerator.backward(loss / num_actions)  # PPO's objective: the mean over steps
                            info["loss"].append(loss.detach())
                            info["approx_kl"].append(stats["approx_kl"])
                            info["clipfrac"].append(stats["clipfrac"])
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(policy.trainable_parameters(), config.train.max_grad_norm)
                        # fp16's loss scaler skips overflowing steps by itself; elsewhere a NaN would reach the weights.
                        if config.mixed_precision != "fp16" and not torch.isfinite(grad_norm):
                            kept = last_checkpoint or "none was written yet"
                            raise NonFiniteError(f"epoch {epoch}: gradient norm {grad_norm.item()}; stopped before the "
                                                 f"update, the last good checkpoint is {kept}")
                        info["grad_norm"].append(grad_norm.detach().float())
                        progress.optimizer_steps += 1
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()

        progress.epoch = epoch + 1
        metrics = {
            "epoch": epoch,
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std()),
            "reward_queries": progress.reward_queries,
            "optimizer_steps": progress.optimizer_steps,
            "lr": lr_scheduler.get_last_lr()[0],
            **{k: accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in info.items()},
        }
        metrics["seconds"] = time.time() - start
        if is_main:
            _write_metrics(metrics_path, metrics)
        accelerator.log(metrics, step=epoch)
        if progress.epoch % config.save_freq == 0 or progress.epoch == config.num_epochs:
            last_checkpoint = save_checkpoint(accelerator, run_dir, progress, config.num_checkpoint_limit)

    if config.grid.num_prompts > 0:
        _sample_grid(policy, grid_prompts, config, run_dir / "grid_last.png", is_main)
    if is_main:
        save_learning_curve(metrics_path, run_dir / "learning_curve.png", title=run_dir.name)
    accelerator.end_training()
    accelerator.print(f"run folder: {run_dir}")
    return run_dir
