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
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from rebel_diffusion.algorithms import ALGORITHMS, Algorithm, PerPromptStatTracker
from rebel_diffusion.algorithms.aggregate import ComponentStatTrackers, advantage_targets, check_aggregate
from rebel_diffusion.algorithms.base import MU_SOURCES, ON_POLICY
from rebel_diffusion.checkpoints import (TrainingProgress, _truncate_metrics, _write_atomic, check_resumable,
                                         finished_epochs, load_checkpoint, lora_hooks, resume_checkpoint,
                                         resumed_run_dir, save_checkpoint, verify_checkpoint)
from rebel_diffusion.config_keys import TRAINER_REWARD_KEYS, check_config_keys, flatten
from rebel_diffusion.errors import CheckpointError, ConfigError  # noqa: F401 -- CheckpointError for train.py
from rebel_diffusion.plots import save_learning_curve
from rebel_diffusion.policies import Policy, make_policy, policy_class
from rebel_diffusion.prompts import PromptSourceError, read_prompt_source
from rebel_diffusion.rewards import (RewardSetupError, call_reward, check_reward_name, make_reward_fn,
                                     parse_reward_spec, reward_kind, served_kinds)
from rebel_diffusion.rewards.preference import (check_preference_config, make_preference_fn, preference_reward,
                                                section_options)
from rebel_diffusion.schedule import OptimizerStepSchedule
from rebel_diffusion.sources import check_mu, sample_groups
from rebel_diffusion.stop_together import stop_together
from rebel_diffusion.trajectory import Trajectory

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """A reward or a gradient came back NaN or infinite; the run stops with its last checkpoint intact."""


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the run stops with its last checkpoint intact."""


def read_prompts(source: str | Path, key: str = "prompt_file") -> list[str]:
    """The prompts of a text file, a JSONL file or a dataset (`rebel_diffusion.prompts`), or a `ConfigError`."""
    try:
        return read_prompt_source(source, key)
    except PromptSourceError as e:
        raise ConfigError(str(e)) from None


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
        if hasattr(policy_class(config.policy), "check_config"):  # a policy's own keys, before any model loads
            policy_class(config.policy).check_config(config)
        check_reward_name(config.reward.name)
        check_aggregate(config, algorithm, len(parse_reward_spec(config.reward.name)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if reward_kind(config.reward.name) not in ("any", policy_kind):
        raise ConfigError(f"reward {config.reward.name!r} scores {reward_kind(config.reward.name)} outputs, but policy "
                          f"{config.policy!r} produces {policy_kind}")
    preference = section_options(config.get("preference"))
    if algorithm.comparisons and not preference["name"]:
        raise ConfigError(f"algorithm {config.algorithm!r} learns from a pairwise preference: set preference.name")
    if algorithm.comparisons and config.reward.aggregate != "sum":
        raise ConfigError(f"reward.aggregate={config.reward.aggregate!r} combines the components of reward.name, but "
                          f"algorithm {config.algorithm!r} learns from preference.name; leave it 'sum'")
    if preference["name"]:
        try:
            check_preference_config(preference, policy_kind)
        except ValueError as e:
            raise ConfigError(str(e)) from None
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
        check_resumable(config, checkpoint)  # first: another run's checkpoint is named as such, not as damaged
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
    try:  # a key set for another policy or reward, before anything loads
        check_config_keys(config, _eval_reward_names(config) if config.eval.prompt_file else [])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    prompts = read_prompts(config.prompt_file)
    try:
        check_mu(algorithm.mu(config), policy_class(config.policy), prompts, config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return prompts, algorithm


def _eval_reward_names(config: ConfigDict) -> list[str]:
    """The rewards scored on held-out prompts: `eval.rewards` (comma-separated), else the training reward."""
    return [name.strip() for name in config.eval.rewards.split(",") if name.strip()] or [config.reward.name]


def _run_dir(config: ConfigDict, checkpoint: Path | None) -> Path:
    """<logdir>/<run_name>; a resumed run without a run_name continues in its own folder."""
    name = config.run_name
    if not name and config.resume_from:
        return resumed_run_dir(config, checkpoint)
    if not name:
        stamp = [datetime.datetime.now().strftime("%Y%m%d_%H%M%S")]
        broadcast_object_list(stamp)  # every process must agree on the folder
        name = f"{config.algorithm}_{stamp[0]}"
    return Path(config.logdir) / name


def _flat_hparams(tree: dict[str, Any]) -> dict[str, Any]:
    """Nested config -> {"a.b": scalar}, the shape TensorBoard's hparams accept."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in flatten(tree).items()}


def _write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(metrics) + "\n")


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


def _reward_generator(seed: int, process: int, epoch: int, batch: int) -> torch.Generator:
    """The generator a reward that draws random numbers gets for one sampling batch: a function of (seed, process,
    epoch, batch) only, so that overlapping the reward with sampling, or resuming, does not change its draws."""
    state = np.random.SeedSequence([seed & (2**64 - 1), process, epoch, batch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _eval_reward_generator(seed: int) -> torch.Generator:
    """The generator a reward that draws random numbers gets on the held-out outputs of evaluation seed `seed`: its own
    stream, not the sampling noise's."""
    state = np.random.SeedSequence([seed & (2**64 - 1), 2**32]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on in the calling thread for `device_type`, and its dtype (autocast is thread-local)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def _submit_score(scorer: ThreadPoolExecutor, device_type: str, *score_args: Any,
                  failed: threading.Event | None = None) -> Future:
    """Run `_score(*score_args)` in the worker thread under `no_grad` and the autocast state of the calling thread:
    grad mode and autocast are thread-local, and the worker must score as the sampling thread would.

    `failed`, shared by the batches of an epoch, is set when one's reward fails; a batch queued behind it is then not
    scored (the run stops with the earlier batch's error), so a failing reward server is not asked again for it."""
    enabled, dtype = _autocast_state(device_type)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if failed is not None and failed.is_set():
            raise RewardError("not scored: the reward of an earlier batch failed")
        try:
            with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                return _score(*score_args)
        except BaseException:
            if failed is not None:
                failed.set()
            raise

    return scorer.submit(run)


def _score(reward_fn: Callable, trajectory: Trajectory, name: str, epoch: int, kept: str,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A batch's rewards `(B,)` float32 and, for a weighted reward, its components; any failure of the reward becomes
    one `RewardError` line naming the reward, the epoch and the batch's first prompt. A reward that takes a
    `generator` keyword gets `generator`."""
    try:
        rewards = call_reward(reward_fn, trajectory.outputs, trajectory.prompts, generator).float()
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
    global RNG is left untouched: a reward that draws random numbers gets a generator that is a function of the seed
    alone (`_eval_reward_generator`), so that every evaluation of a run draws the same numbers."""
    scores, outputs_by_seed = defaultdict(list), []
    for seed in seeds:
        outputs = policy.sample(prompts, generator=torch.Generator().manual_seed(seed)).outputs
        outputs_by_seed.append(outputs)
        for name, reward_fn in reward_fns.items():
            try:
                drawn = call_reward(reward_fn, outputs, prompts, _eval_reward_generator(seed))
                scores[name].append(torch.as_tensor(drawn, dtype=torch.float32).cpu())
            except Exception as e:  # a reward server gone away, user code failing: one line, as in training
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RewardError(f"held-out evaluation: reward {name!r} failed on the prompts whose first is "
                                  f"{prompts[0]!r}: {detail}") from e
    return {f"eval_{name}": torch.cat(values).mean().item() for name, values in scores.items()}, outputs_by_seed


def _diversity_across_seeds(policy: Policy, prompts: list[str], outputs_by_seed: list) -> float:
    """`policy.diversity` of the held-out outputs: pairs of seeds of the same prompt (NaN with one seed)."""
    first = outputs_by_seed[0]
    outputs = torch.cat(outputs_by_seed) if isinstance(first, torch.Tensor) else [o for out in outputs_by_seed for o in out]
    return policy.diversity(outputs, prompts * len(outputs_by_seed))


def _number(value: float) -> str:
    """A metric for the console: 3 decimals, or 3 significant digits when that would show 0.000."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 or not np.isfinite(value) else f"{value:.2e}"


def epoch_summary(epochs_done: int, num_epochs: int, metrics: dict[str, Any], eval_metrics: dict[str, Any]) -> str:
    """The console line after `epochs_done` epochs: the last epoch's reward, kl, diversity and seconds (when it
    trained one) and the held-out metrics evaluated after it, e.g.
    `epoch 3/24  reward 0.812  kl 0.031  diversity 0.210  eval_shape_accuracy 0.780  12.3 s`."""
    parts = [f"epoch {epochs_done}/{num_epochs}"]
    for key, name in (("reward_mean", "reward"), ("kl", "kl"), ("diversity", "diversity")):
        if key in metrics:
            parts.append(f"{name} {_number(metrics[key])}")
    parts += [f"{key} {_number(value)}" for key, value in eval_metrics.items() if key.startswith("eval_")]
    if "seconds" in metrics:
        parts.append(f"{metrics['seconds']:.1f} s")
    return "  ".join(parts)


DEEPSPEED_UNSUPPORTED = ("DeepSpeed is not supported (its engine steps at every backward and its gradient clipping and "
                         "ZeRO-sharded .grad break the trainer's update); for sharded training use accelerate's FSDP "
                         "(distributed_type: FSDP) instead")


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
        raise ConfigError(DEEPSPEED_UNSUPPORTED)


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
    if last_checkpoint is not None and finished_epochs(last_checkpoint) == config.num_epochs:
        PartialState().print(f"{last_checkpoint} already finished the run's {config.num_epochs} epochs; nothing to do "
                             "(raise num_epochs to train on)")
        return resumed_run_dir(config, last_checkpoint)
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
    resumed_dir = resumed_run_dir(config, last_checkpoint)
    if metrics_path.exists() and (resumed_dir is None or resumed_dir.resolve() != run_dir.resolve()):
        raise ConfigError(f"run folder {str(run_dir)!r} already holds a run; resume it with "
                          f"--config.resume_from={run_dir} or choose another run_name")
    is_main = accelerator.is_main_process
    if config.resume_from and last_checkpoint is None:
        accelerator.print(f"{run_dir} has no complete checkpoint yet: the run starts over from epoch 0")
    set_seed(config.seed, device_specific=True)

    dtype = DTYPES[config.mixed_precision]
    # The rewards first: a bad head path fails before a multi-GB model download.
    reward_options = {k: v for k, v in config.reward.items() if k not in TRAINER_REWARD_KEYS}
    eval_names = _eval_reward_names(config) if config.eval.prompt_file else []
    try:
        reward_fn = make_reward_fn(config.reward.name, device=accelerator.device, dtype=dtype, **reward_options)
        eval_reward_fns = {name: reward_fn if name == config.reward.name else
                           make_reward_fn(name, device=accelerator.device, dtype=dtype, **reward_options)
                           for name in eval_names}
    except RewardSetupError as e:
        raise ConfigError(f"reward {config.reward.name!r}: {e}") from None
    k = algorithm.group_size(config)
    trained = algorithm.trained_samples or k  # the first samples of each group train; the rest are compared against
    train_reward_name = config.reward.name
    if algorithm.comparisons:  # the run learns from comparisons; reward.name still scores the held-out evaluation
        train_reward_name = config.preference.name
        try:
            preference_fn = make_preference_fn(config.preference.name, device=accelerator.device, dtype=dtype,
                                               **{key: v for key, v in section_options(config.preference).items()
                                                  if key != "name"})
        except RewardSetupError as e:
            raise ConfigError(f"preference {config.preference.name!r}: {e}") from None
        train_reward_fn = preference_reward(preference_fn, k, algorithm.comparisons)
    else:
        train_reward_fn = reward_fn
    for fn in (reward_fn, *eval_reward_fns.values()):  # a reward server says what it scores only when asked
        for url, kind in served_kinds(fn).items():
            if kind not in ("any", policy_class(config.policy).kind):
                raise ConfigError(f"reward server {url} scores {kind} outputs (its /health), but policy "
                                  f"{config.policy!r} produces {policy_class(config.policy).kind}")
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

    groups_per_epoch = config.sample.batch_size * config.sample.num_batches_per_epoch
    steps_per_epoch = groups_per_epoch // config.train.batch_size // config.train.gradient_accumulation_steps
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(), lr=config.train.learning_rate,
        betas=(config.train.adam_beta1, config.train.adam_beta2),
        weight_decay=config.train.adam_weight_decay, eps=config.train.adam_epsilon,
    )
    # Not prepared: accelerate would step it once per process. It sets the lr from progress.optimizer_steps, so a
    # resumed run continues the curve of its new settings on any number of processes.
    progress = TrainingProgress()
    lr_scheduler = OptimizerStepSchedule(
        optimizer, config.train.lr_schedule, config.train.learning_rate, config.train.lr_warmup_steps,
        steps_per_epoch * config.train.num_inner_epochs * config.num_epochs, progress,
    )
    policy.model, optimizer = accelerator.prepare(policy.model, optimizer)
    # "advantage": the targets are made per component, each with the history of that component alone.
    weights = dict(parse_reward_spec(config.reward.name))
    by_component = config.reward.aggregate == "advantage"
    stat_tracker = (ComponentStatTrackers(list(weights), config.stat_tracker.buffer_size, config.stat_tracker.min_count)
                    if by_component else
                    PerPromptStatTracker(config.stat_tracker.buffer_size, config.stat_tracker.min_count))
    lora_hooks(accelerator, policy)
    if last_checkpoint is not None:
        changed = check_resumable(config, last_checkpoint)
        load_checkpoint(accelerator, last_checkpoint, progress, stat_tracker)
        lr_scheduler.step()  # the loaded optimizer state brought back the checkpoint's lr
        accelerator.print(f"resuming {last_checkpoint} at epoch {progress.epoch}, optimizer step "
                          f"{progress.optimizer_steps}, lr {lr_scheduler.get_last_lr()[0]:.3g}"
                          + (f"; changed: {'; '.join(changed)}" if changed else ""))

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
    mu = algorithm.mu(config)

    summary: dict[str, Any] | None = None  # the last epoch's metrics, printed once its evaluation (if any) is done
    for epoch in range(progress.epoch, config.num_epochs + 1):
        eval_metrics = {}
        if eval_prompts and (epoch % config.eval.every == 0 or epoch == config.num_epochs):
            try:
                scores, outputs_by_seed = evaluate(policy, eval_prompts, eval_seeds, eval_reward_fns)
            except RewardError as e:
                kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
                raise RewardError(f"epoch {epoch}: {e}; stopped, {kept}") from e.__cause__
            if np.isfinite(diversity := _diversity_across_seeds(policy, eval_prompts, outputs_by_seed)):
                scores["eval_diversity"] = diversity
            eval_metrics = {"epoch": epoch, **scores}
            if is_main:
                _write_metrics(eval_path, eval_metrics)
                (run_dir / "eval").mkdir(exist_ok=True)
                policy.write_outputs(eval_prompts, outputs_by_seed, run_dir / "eval" / f"epoch_{epoch:04d}")
                _log_images(accelerator, "eval", outputs_by_seed[0], epoch)
            accelerator.log(scores, step=epoch)
        if is_main and (summary is not None or eval_metrics):  # tqdm.write keeps the line clear of progress bars
            tqdm.write(epoch_summary(epoch, config.num_epochs, summary or {}, eval_metrics))
        summary = None
        if epoch == config.num_epochs:
            break
        start = time.time()
        diversities: list[float] = []  # policy.diversity of each sampling batch, while its outputs exist
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)

        # Sampling: k trajectories per prompt, stored group-major (sample j of group g at g * k + j). The networks stay
        # in eval mode throughout: dropout would make an unchanged policy's ratio differ from 1.
        batches, components, by_source = [], defaultdict(list), []
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"

        def keep(trajectory: Trajectory, scored: Future, sources: list[str]) -> None:
            """Attach a sampled batch's rewards, drop its outputs and store it group-major (sample j of group g at
            g * k + j)."""
            rewards, parts = scored.result()
            for j, (source, reward) in enumerate(zip(sources, rewards.tolist())):  # sample j // B of its group
                by_source.append((source, reward, j >= len(trajectory) // k))
            # Measured here, after the reward thread is done with the batch, so that it never stalls the sampler.
            diversities.append(policy.diversity(trajectory.outputs, trajectory.prompts))
            trajectory.rewards = rewards.to(accelerator.device)
            group_major = torch.arange(len(trajectory)).reshape(k, -1).T.flatten()
            for name, scores in parts.items():  # in the samples' order, for the per-component targets
                components[name].append(scores.float().to(accelerator.device)[group_major])
            if trajectory.truncated is not None and config.reward.missing_eos_penalty is not None:
                penalty = torch.tensor(float(config.reward.missing_eos_penalty), device=accelerator.device)
                trajectory.rewards = torch.where(trajectory.truncated.to(accelerator.device), penalty, trajectory.rewards)
            trajectory.outputs = None  # outputs are not needed past the reward; free their memory
            batches.append(trajectory[group_major])

        # Batch i is scored in a worker thread while batch i+1 samples; the rewards are the same as in sequence.
        with ThreadPoolExecutor(max_workers=1) as scorer:
            pending, failed = None, threading.Event()
            for batch_index in tqdm(range(config.sample.num_batches_per_epoch), desc=f"epoch {epoch}: sampling",
                                    disable=not is_main):
                batch_prompts = random.choices(prompt_pool, k=config.sample.batch_size)
                trajectory, sources = sample_groups(policy, batch_prompts, k, mu, with_kl=shape_reward_with_kl)
                generator = _reward_generator(config.seed, accelerator.process_index, epoch, batch_index)
                scored = _submit_score(scorer, accelerator.device.type, train_reward_fn, trajectory, train_reward_name,
                                       epoch, kept, generator, failed=failed)
                if not config.sample.overlap_reward:
                    scored.result()
                if pending is not None:
                    keep(*pending)
                pending = (trajectory, scored, sources)
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
        # Every component gathered as the rewards are (process order, then each process's rows), in the spec's order.
        all_components = {name: accelerator.gather(torch.cat(components[name])).cpu().numpy().reshape(-1, k)
                          for name in weights} if len(components) > 1 else {}
        if by_component:
            targets, shares = advantage_targets(algorithm, all_components, weights, all_prompts, stat_tracker, config)
        else:
            targets = algorithm.targets(shaped, all_prompts, stat_tracker, config)
        local = torch.as_tensor(targets.reshape(accelerator.num_processes, -1)[accelerator.process_index],
                                dtype=torch.float32, device=accelerator.device)
        progress.reward_queries += len(all_rewards) * (len(algorithm.comparisons) or k)  # a comparison is a query

        # Training: shuffled micro-batches of whole groups.
        info = defaultdict(list)
        num_groups = len(samples) // k
        for inner_epoch in range(config.train.num_inner_epochs):
            order = torch.randperm(num_groups)
            for first in tqdm(range(0, num_groups, config.train.batch_size), desc=f"epoch {epoch}.{inner_epoch}: training",
                              disable=not is_main):
                groups = order[first : first + config.train.batch_size]
                index = (groups[:, None] * k + torch.arange(trained)).flatten()
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
            "reward_mean": float(all_rewards[:, :trained].mean()),
            "reward_std": float(all_rewards[:, :trained].std()),
            "reward_queries": progress.reward_queries,
            "optimizer_steps": progress.optimizer_steps,
            "lr": lr_scheduler.get_last_lr()[0],
            **{key: accelerator.reduce(torch.stack(values).mean().to(accelerator.device), "mean").item()
               for key, values in info.items()},
        }
        for name, scores in all_components.items():
            metrics[f"reward_{name}_mean"] = float(scores.mean())
            if by_component:
                metrics[f"advantage_share_{name}"] = shares[name]
        if all_kl:
            metrics["kl"] = float(np.mean(all_kl))
        if mu.probabilities != ON_POLICY.probabilities:
            # Which source each y' came from, and the mean reward of each source's samples: reward_mean mixes them,
            # reward_policy_mean is the policy's own.
            drawn = gather_object(by_source)
            later = [source for source, _, is_later in drawn if is_later]
            for source in MU_SOURCES:
                metrics[f"mu_{source}_fraction"] = later.count(source) / len(later)
                if scores := [reward for s, reward, _ in drawn if s == source]:
                    metrics[f"reward_{source}_mean"] = float(np.mean(scores))
        # The epoch's mean over batches (of every process) of the distance between samples of the same prompt: a
        # reward won by collapsing to one output per prompt shows as diversity near 0. Absent when no prompt was
        # sampled twice in a batch (one sample per prompt, as PPO's, and no repeated prompt).
        if batch_diversity := [d for d in gather_object(diversities) if np.isfinite(d)]:
            metrics["diversity"] = float(np.mean(batch_diversity))
        if shape_reward_with_kl:
            metrics["reward_shaped_mean"] = float(shaped.mean())
        if accelerator.device.type == "cuda":  # what the epoch needed at most: the number to size a GPU by
            metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
        metrics["seconds"] = time.time() - start
        if is_main:
            _write_metrics(metrics_path, metrics)
        accelerator.log(metrics, step=epoch)
        summary = metrics
        if progress.epoch % config.save_freq == 0 or progress.epoch == config.num_epochs:
            last_checkpoint = save_checkpoint(accelerator, run_dir, progress, config.num_checkpoint_limit, config, metrics,
                                              stat_tracker)

    if config.grid.num_prompts > 0:
        policy.save_samples(grid_prompts, grid_seeds, run_dir / "grid_last" if is_main else None)
    if is_main:
        save_learning_curve(metrics_path, run_dir / "learning_curve.png", title=run_dir.name,
                            eval_path=eval_path if eval_path.exists() else None)
    accelerator.end_training()
    accelerator.print(f"run folder: {run_dir}")
    return run_dir
