"""The training loop: sample trajectories, score them, turn rewards into targets, update the policy's adapter.

One epoch reads top to bottom in `train`: sampling k trajectories per prompt, rewards and the KL to the base model,
targets from the rewards of every process, then `num_inner_epochs` passes of shuffled micro-batches of whole groups.
The trainer drives any policy through `rebel_diffusion.policies.Policy` and any algorithm through
`rebel_diffusion.algorithms.base.Algorithm`, and knows none of them by name. accelerate handles processes, mixed
precision, gradient accumulation and checkpoint state.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import shutil
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from ml_collections import ConfigDict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rebel_diffusion.algorithms import ALGORITHMS, Algorithm, PerPromptStatTracker
from rebel_diffusion.model_card import write_model_card
from rebel_diffusion.plots import save_learning_curve
from rebel_diffusion.policies import Policy, make_policy, policy_class
from rebel_diffusion.prompts import PromptSourceError, read_prompt_source
from rebel_diffusion.rewards import RewardSetupError, check_reward_name, make_reward_fn, reward_kind
from rebel_diffusion.stop_together import stop_together
from rebel_diffusion.trajectory import Trajectory

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHECKPOINT_FILE = "checkpoint.json"


class ConfigError(ValueError):
    """A problem with the user's input, reported as one line before any compute is spent."""


class NonFiniteError(RuntimeError):
    """A reward or a gradient came back NaN or infinite; the run stops with its last checkpoint intact."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, permissions); the previous one is intact."""


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the run stops with its last checkpoint intact."""


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


def read_prompts(source: str | Path, key: str = "prompt_file") -> list[str]:
    """The prompts of a text file, a JSONL file or a dataset (`rebel_diffusion.prompts`), or a `ConfigError`."""
    try:
        return read_prompt_source(source, key)
    except PromptSourceError as e:
        raise ConfigError(str(e)) from None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's finished checkpoints, oldest first (not the `.tmp`/`.old` folders of an interrupted write)."""
    folders = (run_dir / "checkpoints").glob("epoch_*")
    return sorted(p for p in folders if re.fullmatch(r"epoch_\d+", p.name) and (p / CHECKPOINT_FILE).is_file())


def verify_checkpoint(checkpoint: Path) -> None:
    """Read every file of a checkpoint before any of it is loaded, so that a damaged file (a truncated optimizer state,
    LoRA weights or stat tracker) stops the resume with one line instead of training from a half-loaded state."""
    for file in sorted(checkpoint.iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix in (".bin", ".pkl", ".pt"):
                torch.load(file, map_location="cpu", weights_only=False)
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as e:  # every loader has its own error types; any of them means the file is unreadable
            earlier = [c for c in complete_checkpoints(checkpoint.parent.parent) if c.name < checkpoint.name]
            offer = (f"; resume from the previous one with --config.resume_from={earlier[-1]}" if earlier
                     else "; no earlier checkpoint exists")
            detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise ConfigError(f"checkpoint file {file} is damaged ({detail}){offer}") from None


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder itself, or the latest complete checkpoint in a run folder."""
    path = Path(path)
    if (path / CHECKPOINT_FILE).is_file():
        return path
    complete = complete_checkpoints(path)
    if not complete:
        raise ConfigError(f"resume_from {str(path)!r} is neither a checkpoint nor a run folder with checkpoints")
    return complete[-1]


def _is_run_folder(path: Path) -> bool:
    """A folder `train` made: its config.json is a training config (a checkpoint of a fully fine-tuned model has a
    config.json too, the model's)."""
    try:
        return {"algorithm", "policy", "reward"} <= json.loads((path / "config.json").read_text()).keys()
    except (OSError, ValueError, AttributeError):
        return False


def resume_checkpoint(path: str | Path) -> Path | None:
    """What `resume_from` resumes: a checkpoint, or the latest complete one of a run folder; None for a run folder
    stopped before its first checkpoint was complete, which then starts over from epoch 0 in the same folder."""
    path = Path(path)
    if not (path / CHECKPOINT_FILE).is_file() and _is_run_folder(path) and not complete_checkpoints(path):
        return None
    return find_checkpoint(path)


def _get(config: ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def validate_config(config: ConfigDict) -> tuple[list[str], Algorithm]:
    """Check everything that can be checked before loading a model; return the prompts and the algorithm."""
    if config.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {config.algorithm!r}; choose one of {list(ALGORITHMS)}")
    algorithm = ALGORITHMS[config.algorithm]
    try:
        algorithm.check(config)
        policy_kind = policy_class(config.policy).kind
        check_reward_name(config.reward.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if reward_kind(config.reward.name) not in ("any", policy_kind):
        raise ConfigError(f"reward {config.reward.name!r} scores {reward_kind(config.reward.name)} outputs, but policy "
                          f"{config.policy!r} produces {policy_kind}")
    if config.kl_coef < 0:
        raise ConfigError(f"kl_coef must be non-negative, got {config.kl_coef}")
    if config.mixed_precision not in DTYPES:
        raise ConfigError(f"mixed_precision must be one of {list(DTYPES)}, got {config.mixed_precision!r}")
    if config.model.logprob_reduction not in ("mean", "sum"):
        raise ConfigError(f"model.logprob_reduction must be 'mean' or 'sum', got {config.model.logprob_reduction!r}")
    pretrained = str(config.model.pretrained)
    if not Path(pretrained).expanduser().exists() and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1):
        raise ConfigError(f"model.pretrained {pretrained!r} is neither an existing folder nor a Hub id (owner/name)")
    for key in ("num_epochs", "save_freq", "num_checkpoint_limit", "sample.batch_size", "sample.num_batches_per_epoch",
                "train.batch_size", "train.gradient_accumulation_steps", "train.num_inner_epochs", "resolution"):
        if _get(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {_get(config, key)}")
    if config.kl_log_samples < 0:
        raise ConfigError(f"kl_log_samples must be non-negative, got {config.kl_log_samples}")
    groups = config.sample.batch_size * config.sample.num_batches_per_epoch
    if groups % (config.train.batch_size * config.train.gradient_accumulation_steps):
        raise ConfigError(
            f"sample.batch_size * sample.num_batches_per_epoch ({groups} prompts per process, each a group of "
            f"{algorithm.group_size(config)} samples) must be a multiple of train.batch_size * "
            "train.gradient_accumulation_steps, so that every optimizer step sees whole groups in whole micro-batches"
        )
    if config.resume_from and (checkpoint := resume_checkpoint(config.resume_from)) is not None:
        verify_checkpoint(checkpoint)
    if config.eval.prompt_file:
        if config.eval.every < 1 or config.eval.num_seeds < 1:
            raise ConfigError("eval.every and eval.num_seeds must be at least 1 when eval.prompt_file is set")
        read_prompts(config.eval.prompt_file, key="eval.prompt_file")
        for name in _eval_reward_names(config):
            try:
                check_reward_name(name)
            except ValueError as e:
                raise ConfigError(f"eval.rewards: {e}") from None
    return read_prompts(config.prompt_file), algorithm


def _eval_reward_names(config: ConfigDict) -> list[str]:
    """The rewards scored on held-out prompts: `eval.rewards` (comma-separated), else the training reward."""
    return [name.strip() for name in config.eval.rewards.split(",") if name.strip()] or [config.reward.name]


def _resumed_run_dir(config: ConfigDict, checkpoint: Path | None) -> Path | None:
    """The folder of the run `resume_from` continues (None for a fresh run)."""
    if not config.resume_from:
        return None
    return checkpoint.parent.parent if checkpoint is not None else Path(config.resume_from)


def _run_dir(config: ConfigDict, checkpoint: Path | None) -> Path:
    """<logdir>/<run_name>; a resumed run without a run_name continues in its own folder."""
    name = config.run_name
    if not name and config.resume_from:
        return _resumed_run_dir(config, checkpoint)
    if not name:
        stamp = [datetime.datetime.now().strftime("%Y%m%d_%H%M%S")]
        broadcast_object_list(stamp)  # every process must agree on the folder
        name = f"{config.algorithm}_{stamp[0]}"
    return Path(config.logdir) / name


def _lora_hooks(accelerator: Accelerator, policy: Policy) -> None:
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


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder`, and the folder itself, to the disk."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, progress: TrainingProgress, keep: int,
                    config: ConfigDict | None = None, metrics: dict[str, Any] | None = None) -> Path:
    """Write the full training state to `checkpoints/epoch_NNNN` atomically: into a temporary folder, then renamed.

    A crash while writing leaves only the temporary folder behind; earlier checkpoints stay intact. With `config`, the
    folder gets a model card (README.md) so that it uploads to a model hub as a proper page.
    """
    final = run_dir / "checkpoints" / f"epoch_{progress.epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:  # what a killed run left half-written or half-deleted: epoch_NNNN.tmp/.old
        for leftover in final.parent.glob("epoch_*.*"):
            if re.fullmatch(r"epoch_\d+\.(tmp|old)", leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if config is not None:
                write_model_card(tmp, config.to_dict(), metrics)
            (tmp / CHECKPOINT_FILE).write_text(json.dumps(progress.state_dict()))
            _fsync_tree(tmp)  # on disk before the rename makes it the checkpoint, even if the machine goes down
    except OSError as e:
        # A half-written folder keeps its .tmp name, which resume never takes for a checkpoint; free its space.
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(run_dir)
        free = shutil.disk_usage(run_dir).free / 2**20
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; {free:.0f} MiB free on that "
                              f"disk; {kept}") from None
    if accelerator.is_main_process:
        if final.exists():
            old = final.with_name(final.name + ".old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in complete_checkpoints(run_dir)[:-keep]:
            old = stale.with_name(stale.name + ".old")  # renamed first: a half-deleted folder is never taken for one
            os.replace(stale, old)
            shutil.rmtree(old)
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


def _write_atomic(path: Path, text: str) -> None:
    """Replace a file's content so that a crash leaves either the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics line; None for a line cut short by a crash."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _truncate_metrics(path: Path, first_epoch: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the file holds each epoch once, and a line cut short
    by a crash."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines()
                 if (epoch := _epoch_of(line)) is not None and epoch < first_epoch]
        _write_atomic(path, "".join(line + "\n" for line in lines))


def _log_images(accelerator: Accelerator, tag: str, outputs: Any, step: int) -> None:
    """Image outputs `(B, 3, H, W)` to TensorBoard, when it is a tracker; text outputs stay in the run folder."""
    if not isinstance(outputs, torch.Tensor):
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, outputs[:16].float().clamp(0, 1).cpu(), step)


def _backward_context(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces at every backward of a sync step; only a micro-batch's last backward needs to."""
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


def step_loss_gradients(accelerator: Accelerator, policy: Policy, algorithm: Algorithm, batch: Trajectory,
                        targets: torch.Tensor, config: ConfigDict, inner_epoch: int) -> dict[str, torch.Tensor]:
    """Accumulate the gradient of a step loss on a micro-batch: one backward per chunk of steps, one graph at a time.

    The micro-batch's loss is the mean over samples of each sample's mean (or sum) over its real steps, plus
    `kl_coef` times the per-step KL to the base model when the algorithm takes the KL as a loss term.
    """
    chunks = policy.step_chunks()
    mask = batch.mask.float()
    denominator = mask.sum() if algorithm.step_reduction == "mean" else torch.tensor(float(len(batch)))
    with_kl = config.kl_coef > 0 and not algorithm.kl_in_reward
    total_loss, sums = torch.zeros(()), defaultdict(lambda: torch.zeros(()))
    for i, steps in enumerate(chunks):
        with _backward_context(accelerator, policy.model, last=i == len(chunks) - 1):
            log_prob, kl = policy.log_prob(batch, steps, with_kl=with_kl)
            step_mask = mask[:, steps.start : steps.stop]
            loss, stats = algorithm.step_loss(log_prob, batch.log_probs[:, steps.start : steps.stop], targets, config,
                                              inner_epoch)
            if with_kl:
                loss = loss + config.kl_coef * kl
                stats["kl_loss"] = kl.detach()
            loss = (loss * step_mask).sum() / denominator
            accelerator.backward(loss)
        total_loss += loss.detach().cpu()
        for key, value in stats.items():
            sums[key] += (value * step_mask).sum().cpu()
    return {"loss": total_loss, **{key: value / mask.sum().cpu() for key, value in sums.items()}}


def pair_loss_gradients(accelerator: Accelerator, policy: Policy, algorithm: Algorithm, batch: Trajectory,
                        targets: torch.Tensor, config: ConfigDict) -> dict[str, torch.Tensor]:
    """Accumulate the exact gradient of a pair loss on a micro-batch of pairs `(a_0, b_0, a_1, b_1, ...)`.

    A pair loss L(delta), delta = log_ratio_a - log_ratio_b with log_ratio = sum_t [log pi_theta - log pi_t], has the
    gradient L'(delta) * (sum_t grad log pi(a_t) - sum_t grad log pi(b_t)). Each chunk's gradient of
    `log_ratio_a - log_ratio_b` is accumulated as it is computed (one graph alive at a time); once the last chunk gives
    the full log-ratios, hence L'(delta), the pair's accumulated gradient is scaled by it, before the last backward so
    that DDP's all-reduce sees the scaled sum. Gradients of earlier pairs and micro-batches are set aside meanwhile.
    """
    chunks, params = policy.step_chunks(), policy.trainable_parameters()
    num_pairs = len(batch) // 2
    if len(chunks) == 1:
        # All steps in one graph (a token policy): every pair of the micro-batch in one forward and one backward.
        log_prob, _ = policy.log_prob(batch, chunks[0])
        ratio = ((log_prob - batch.log_probs[:, : log_prob.shape[1]]) * batch.mask[:, : log_prob.shape[1]]).sum(dim=1)
        loss = algorithm.pair_loss(ratio[0::2], ratio[1::2], targets[0::2], targets[1::2], config)
        accelerator.backward(loss)
        return {"loss": loss.detach().cpu()}
    losses = []
    for pair_index in range(num_pairs):
        pair = batch[[2 * pair_index, 2 * pair_index + 1]]
        target = targets[2 * pair_index : 2 * pair_index + 2]
        earlier = [param.grad for param in params]
        for param in params:
            param.grad = None
        totals = torch.zeros(2, device=target.device)
        for i, steps in enumerate(chunks):
            last = i == len(chunks) - 1
            with _backward_context(accelerator, policy.model, last=last and pair_index == num_pairs - 1):
                log_prob, _ = policy.log_prob(pair, steps)
                step_mask = pair.mask[:, steps.start : steps.stop]
                ratio = ((log_prob - pair.log_probs[:, steps.start : steps.stop]) * step_mask).sum(dim=1)
                if not last:
                    accelerator.backward(ratio[0] - ratio[1])
                    totals += ratio.detach()
                    continue
                full = (totals + ratio.detach()).requires_grad_()
                loss = algorithm.pair_loss(full[:1], full[1:], target[:1], target[1:], config)
                grad_a, grad_b = torch.autograd.grad(loss, full)[0]
                if torch.isfinite(grad_a) and not torch.isclose(grad_a, -grad_b, rtol=1e-4, atol=1e-12):
                    raise RuntimeError(f"algorithm {algorithm.name!r}: its pair loss must depend on log_ratio_a - log_ratio_b")
                scale = grad_a / num_pairs
                for param, before in zip(params, earlier):
                    if param.grad is not None:
                        param.grad.mul_(scale)
                    if before is not None:
                        param.grad = before if param.grad is None else param.grad.add_(before)
                accelerator.backward((grad_a * ratio[0] + grad_b * ratio[1]) / num_pairs)
        losses.append(loss.detach().cpu())
    return {"loss": torch.stack(losses).mean()}


def _score(reward_fn: Callable, trajectory: Trajectory, name: str, epoch: int,
           kept: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch's rewards `(B,)` float32 and, for a weighted reward, its components; any failure of the reward becomes
    one `RewardError` line naming the reward, the epoch and the batch's first prompt."""
    try:
        rewards = reward_fn(trajectory.outputs, trajectory.prompts).float()
    except Exception as e:  # any failure of user code; reported as one line, the last checkpoint is intact
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RewardError(f"epoch {epoch}: reward {name!r} failed on the batch whose first prompt is "
                          f"{trajectory.prompts[0]!r}: {detail}; stopped, {kept}") from e
    return rewards, dict(getattr(reward_fn, "last_components", {}))


def _trajectory_kl(policy: Policy, samples: Trajectory, num: int) -> torch.Tensor:
    """Each trajectory's KL to the base model, `sum_t KL_t` `(B,)`: from sampling when recorded, else computed on the
    first `num` trajectories only (a logging estimate that costs a few forward passes, not a pass per step)."""
    if samples.kl is not None:
        return samples.masked_sum(samples.kl)
    if not num or not policy.has_reference:
        return torch.zeros(0, device=samples.log_probs.device)
    subset = samples[:num]
    return subset.masked_sum(policy.kl(subset))


@torch.no_grad()
def evaluate(policy: Policy, prompts: list[str], seeds: list[int],
             reward_fns: dict[str, Callable]) -> tuple[dict[str, float], list]:
    """Mean of each reward on held-out prompts x fixed seeds, as `eval_<name>`, and the outputs of each seed; the
    global RNG is left untouched."""
    scores, outputs_by_seed = defaultdict(list), []
    for seed in seeds:
        outputs = policy.sample(prompts, generator=torch.Generator().manual_seed(seed)).outputs
        outputs_by_seed.append(outputs)
        for name, reward_fn in reward_fns.items():
            scores[name].append(torch.as_tensor(reward_fn(outputs, prompts), dtype=torch.float32).cpu())
    return {f"eval_{name}": torch.cat(values).mean().item() for name, values in scores.items()}, outputs_by_seed


def check_distributed_backend(config: ConfigDict | None = None) -> None:
    """Refuse DeepSpeed before anything loads: under it accelerate's `clip_grad_norm_` returns a float or None, the
    engine steps the optimizer at every backward (the trainer accumulates several), and ZeRO drops the in-place `.grad`
    scaling of `pair_loss_gradients`. Refuse FSDP where it is known not to work: without a GPU accelerate never enables
    it (it would run DDP and say nothing), and the multi-chunk pair loss scales `.grad` in place between backwards."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1") or (
            state.get("distributed_type") == DistributedType.FSDP):
        algorithm = ALGORITHMS.get(config.algorithm) if config is not None else None
        try:
            image = config is not None and policy_class(config.policy).kind == "image"
        except ValueError:
            image = False  # validate_config names the unknown policy
        if algorithm is not None and algorithm.pair_loss is not None and image:
            raise ConfigError(f"FSDP with {config.algorithm!r} on the {config.policy!r} policy is not supported: its "
                              "pair loss scales the sharded .grad in place between one backward per chain step; use DDP "
                              "(--multi_gpu) or a step-loss algorithm (ppo, rloo, grpo)")
        if not torch.cuda.is_available():
            raise ConfigError("FSDP needs GPUs: without one accelerate does not shard and would silently run DDP; "
                              "drop the FSDP config (several CPU processes: --num_processes N)")
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1")
            or state.get("distributed_type") == DistributedType.DEEPSPEED):
        raise ConfigError("DeepSpeed is not supported (its engine steps at every backward and its gradient clipping and "
                          "ZeRO-sharded .grad break the trainer's update); for sharded training use accelerate's FSDP "
                          "(distributed_type: FSDP) instead")


def train(config: ConfigDict) -> Path:
    """Run (or resume) one training run; returns its folder. An error on any process stops every process."""
    check_distributed_backend(config)
    if not config.collective_timeout_s > 0:
        raise ConfigError(f"collective_timeout_s must be positive, got {config.collective_timeout_s}")
    # A collective waits at most collective_timeout_s for a process that died without a word (killed, out of memory).
    PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=config.collective_timeout_s))
    with stop_together():  # the checks too: a model or prompt file may be missing on one machine only
        prompt_pool, algorithm = validate_config(config)
        return _train(config, prompt_pool, algorithm)


def _train(config: ConfigDict, prompt_pool: list[str], algorithm: Algorithm) -> Path:
    """The run itself: setup, then one epoch after another, top to bottom."""
    last_checkpoint = resume_checkpoint(config.resume_from) if config.resume_from else None
    # The processes agree on the run folder first: trackers write to <project_dir>/<run_name>.
    run_dir = _run_dir(config, last_checkpoint)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=config.log_with or None,
        project_dir=str(run_dir.parent),
    )
    metrics_path, eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    # Only the run being resumed may already have metrics here: another run's would be truncated and mixed in.
    resumed_dir = _resumed_run_dir(config, last_checkpoint)
    if metrics_path.exists() and (resumed_dir is None or resumed_dir.resolve() != run_dir.resolve()):
        raise ConfigError(f"run folder {str(run_dir)!r} already holds a run; resume it with "
                          f"--config.resume_from={run_dir} or choose another run_name")
    is_main = accelerator.is_main_process
    if config.resume_from and last_checkpoint is None:
        accelerator.print(f"{run_dir} has no complete checkpoint yet: the run starts over from epoch 0")
    set_seed(config.seed, device_specific=True)

    dtype = DTYPES[config.mixed_precision]
    # The rewards first: a bad head path fails before a multi-GB model download.
    reward_options = {k: v for k, v in config.reward.items() if k != "name"}
    eval_names = _eval_reward_names(config) if config.eval.prompt_file else []
    try:
        reward_fn = make_reward_fn(config.reward.name, device=accelerator.device, dtype=dtype, **reward_options)
        eval_reward_fns = {name: reward_fn if name == config.reward.name else
                           make_reward_fn(name, device=accelerator.device, dtype=dtype, **reward_options)
                           for name in eval_names}
    except RewardSetupError as e:
        raise ConfigError(f"reward {config.reward.name!r}: {e}") from None
    try:
        policy = make_policy(config, accelerator.device, dtype)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    try:
        policy.check_prompts(prompt_pool)
    except ValueError as e:
        raise ConfigError(f"prompt_file: {e}") from None
    if config.kl_coef > 0 and not policy.has_reference:
        raise ConfigError("kl_coef > 0 needs the base model as reference, the adapter disabled: set lora.rank > 0")
    k = algorithm.group_size(config)

    groups_per_epoch = config.sample.batch_size * config.sample.num_batches_per_epoch
    steps_per_epoch = groups_per_epoch // config.train.batch_size // config.train.gradient_accumulation_steps
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
    policy.model, optimizer, lr_scheduler = accelerator.prepare(policy.model, optimizer, lr_scheduler)
    stat_tracker = PerPromptStatTracker(config.stat_tracker.buffer_size, config.stat_tracker.min_count)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(stat_tracker, progress)
    _lora_hooks(accelerator, policy)
    if last_checkpoint is not None:
        accelerator.load_state(str(last_checkpoint))

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, progress.epoch)
        _truncate_metrics(eval_path, progress.epoch)
        _write_atomic(run_dir / "config.json", config.to_json_best_effort(indent=2))
    accelerator.init_trackers(run_dir.name, config=_flat_hparams(config.to_dict()))
    grid_prompts = list(dict.fromkeys(prompt_pool))[: config.grid.num_prompts]
    grid_seeds = [config.grid.seed + j for j in range(config.grid.num_seeds)]
    if progress.epoch == 0 and config.grid.num_prompts > 0:
        policy.save_samples(grid_prompts, grid_seeds, run_dir / "grid_first" if is_main else None)
    eval_prompts = read_prompts(config.eval.prompt_file, "eval.prompt_file") if config.eval.prompt_file else []
    eval_seeds = [config.eval.seed + j for j in range(config.eval.num_seeds)]
    shape_reward_with_kl = algorithm.kl_in_reward and config.kl_coef > 0

    for epoch in range(progress.epoch, config.num_epochs + 1):
        if eval_prompts and (epoch % config.eval.every == 0 or epoch == config.num_epochs):
            scores, outputs_by_seed = evaluate(policy, eval_prompts, eval_seeds, eval_reward_fns)
            eval_metrics = {"epoch": epoch, **scores}
            if is_main:
                _write_metrics(eval_path, eval_metrics)
                (run_dir / "eval").mkdir(exist_ok=True)
                policy.write_outputs(eval_prompts, outputs_by_seed, run_dir / "eval" / f"epoch_{epoch:04d}")
                _log_images(accelerator, "eval", outputs_by_seed[0], epoch)
            accelerator.log(scores, step=epoch)
        if epoch == config.num_epochs:
            break
        start = time.time()
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)

        # Sampling: k trajectories per prompt, stored group-major (sample j of group g at g * k + j). The networks stay
        # in eval mode throughout: dropout would make an unchanged policy's ratio differ from 1.
        batches, components = [], defaultdict(list)
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"

        def keep(trajectory: Trajectory, scored: Future) -> None:
            """Attach a sampled batch's rewards, drop its outputs and store it group-major (sample j of group g at
            g * k + j)."""
            rewards, parts = scored.result()
            trajectory.rewards = rewards.to(accelerator.device)
            for name, scores in parts.items():
                components[name].append(scores.float().to(accelerator.device))
            if trajectory.truncated is not None and config.reward.missing_eos_penalty is not None:
                penalty = torch.tensor(float(config.reward.missing_eos_penalty), device=accelerator.device)
                trajectory.rewards = torch.where(trajectory.truncated.to(accelerator.device), penalty, trajectory.rewards)
            trajectory.outputs = None  # outputs are not needed past the reward; free their memory
            batches.append(trajectory[torch.arange(len(trajectory)).reshape(k, -1).T.flatten()])

        # Batch i is scored in a worker thread while batch i+1 samples; the rewards are the same as in sequence.
        with ThreadPoolExecutor(max_workers=1) as scorer:
            pending = None
            for _ in tqdm(range(config.sample.num_batches_per_epoch), desc=f"epoch {epoch}: sampling",
                          disable=not is_main):
                batch_prompts = random.choices(prompt_pool, k=config.sample.batch_size)
                trajectory = policy.sample(batch_prompts * k, with_kl=shape_reward_with_kl)
                scored = scorer.submit(_score, reward_fn, trajectory, config.reward.name, epoch, kept)
                if not config.sample.overlap_reward:
                    scored.result()
                if pending is not None:
                    keep(*pending)
                pending = (trajectory, scored)
            keep(*pending)
        samples = Trajectory.cat(batches)

        # Rewards of all processes feed one computation of targets, identical on every process; each keeps its rows.
        all_rewards = accelerator.gather(samples.rewards).cpu().numpy().reshape(-1, k)
        all_prompts = gather_object(samples.prompts)[::k]
        bad = np.flatnonzero(~np.isfinite(all_rewards.reshape(-1)))
        if bad.size:
            raise NonFiniteError(f"epoch {epoch}: reward {all_rewards.reshape(-1)[bad[0]]} for prompt "
                                 f"{all_prompts[bad[0] // k]!r}; stopped, {kept}")
        with torch.no_grad():
            kl = _trajectory_kl(policy, samples, config.kl_log_samples)
        all_kl = gather_object(kl.cpu().tolist())
        shaped = all_rewards
        if shape_reward_with_kl:
            shaped = all_rewards - config.kl_coef * np.asarray(all_kl).reshape(all_rewards.shape)
        targets = algorithm.targets(shaped, all_prompts, stat_tracker, config)
        local = torch.as_tensor(targets.reshape(accelerator.num_processes, -1)[accelerator.process_index],
                                dtype=torch.float32, device=accelerator.device)
        progress.reward_queries += all_rewards.size

        # Training: shuffled micro-batches of whole groups.
        info = defaultdict(list)
        num_groups = len(samples) // k
        for inner_epoch in range(config.train.num_inner_epochs):
            order = torch.randperm(num_groups)
            for first in tqdm(range(0, num_groups, config.train.batch_size), desc=f"epoch {epoch}.{inner_epoch}: training",
                              disable=not is_main):
                groups = order[first : first + config.train.batch_size]
                index = (groups[:, None] * k + torch.arange(k)).flatten()
                batch, target = samples[index], local[index]
                with accelerator.accumulate(policy.model):
                    if algorithm.pair_loss is not None:
                        stats = pair_loss_gradients(accelerator, policy, algorithm, batch, target, config)
                    else:
                        stats = step_loss_gradients(accelerator, policy, algorithm, batch, target, config, inner_epoch)
                    for key, value in stats.items():
                        info[key].append(value)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(policy.trainable_parameters(), config.train.max_grad_norm)
                        # fp16's loss scaler skips overflowing steps by itself; elsewhere a NaN would reach the weights.
                        if config.mixed_precision != "fp16" and not torch.isfinite(grad_norm):
                            raise NonFiniteError(f"epoch {epoch}: gradient norm {grad_norm.item()}; stopped before the "
                                                 f"update, {kept}")
                        info["grad_norm"].append(grad_norm.detach().float().cpu())
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
            **{key: accelerator.reduce(torch.stack(values).mean().to(accelerator.device), "mean").item()
               for key, values in info.items()},
        }
        if len(components) > 1:
            for name, scores in components.items():
                metrics[f"reward_{name}_mean"] = accelerator.gather(torch.cat(scores)).float().mean().item()
        if all_kl:
            metrics["kl"] = float(np.mean(all_kl))
        if shape_reward_with_kl:
            metrics["reward_shaped_mean"] = float(shaped.mean())
        if accelerator.device.type == "cuda":  # what the epoch needed at most: the number to size a GPU by
            metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
        metrics["seconds"] = time.time() - start
        if is_main:
            _write_metrics(metrics_path, metrics)
        accelerator.log(metrics, step=epoch)
        if progress.epoch % config.save_freq == 0 or progress.epoch == config.num_epochs:
            last_checkpoint = save_checkpoint(accelerator, run_dir, progress, config.num_checkpoint_limit, config, metrics)

    if config.grid.num_prompts > 0:
        policy.save_samples(grid_prompts, grid_seeds, run_dir / "grid_last" if is_main else None)
    if is_main:
        save_learning_curve(metrics_path, run_dir / "learning_curve.png", title=run_dir.name,
                            eval_path=eval_path if eval_path.exists() else None)
    accelerator.end_training()
    accelerator.print(f"run folder: {run_dir}")
    return run_dir
