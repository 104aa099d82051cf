"""Run folders and checkpoints: finding the one to resume, checking it before anything loads, writing it atomically.

A checkpoint is `<run>/checkpoints/epoch_NNNN`: accelerate's state (the optimizer, the RNG of each process), the
trainable weights (written by the policy), and three JSON files written here: `checkpoint.json` (where the run is,
`TrainingProgress`), `stat_tracker.json` (the per-prompt reward buffers) and `training_config.json` (the config that
wrote it, so that the folder alone says which run it belongs to). Nothing in a checkpoint is unpickled as an object:
pickles are read with `weights_only=True` (tensors, numbers, strings and containers only), so a planted pickle is refused
instead of run.

Resuming continues the same run. The keys in `RUN_KEYS` define it and must equal the checkpoint's; the keys in
`RESUMABLE_KEYS` may change and take effect (`check_resumable`). A key in neither set is treated as defining the run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import load as safe_load  # torch.load(weights_only=True), with numpy arrays allowed (RNG states)
from ml_collections import ConfigDict
from safetensors.torch import load_file

from rebel_diffusion.config_keys import flatten
from rebel_diffusion.errors import CheckpointError, ConfigError
from rebel_diffusion.model_card import write_model_card

CHECKPOINT_FILE = "checkpoint.json"
STAT_TRACKER_FILE = "stat_tracker.json"
CONFIG_FILE = "training_config.json"  # not config.json: a fully fine-tuned model's folder holds the model's config.json
LEGACY_STATE = re.compile(r"custom_checkpoint_\d+\.pkl")  # the stat tracker (0) and progress (1), pickled by accelerate

# What the run is: resuming with another value would continue a different experiment under the old one's name (its
# metrics, checkpoints and curve), or fail half-way through loading (another policy's weights, another optimizer's
# parameter shapes). The algorithm sections count for the checkpoint's algorithm and the new one only.
# The number of processes is not here: every batch size is per process and the schedule counts optimizer steps, so a
# run resumed on more processes keeps its optimizer steps per epoch and its learning-rate curve, with bigger batches.
RUN_KEYS = frozenset({
    "algorithm", "policy", "kl_coef", "seed", "resolution", "mixed_precision", "prompt_file",
    "model.pretrained", "model.num_steps", "model.guidance_scale", "model.logprob_reduction", "model.max_new_tokens",
    "model.temperature", "model.top_k", "model.top_p", "model.chat_template", "model.kl_estimator",
    "model.max_sequence_length",
    "reward.reward_model_path",
    "lora.rank", "lora.alpha", "lora.init", "lora.targets",
    "reward.name", "reward.aggregate", "reward.head_path", "reward.clip_pretrained", "reward.clip_model", "reward.missing_eos_penalty",
    "reward.judge.model", "reward.judge.template", "reward.judge.system", "reward.judge.score", "reward.judge.pattern",
    "reward.judge.score_min", "reward.judge.score_max", "reward.judge.max_tokens", "reward.judge.temperature",
    "reward.judge.top_logprobs",
    "preference.name", "preference.reward", "preference.temperature",
    "sample.batch_size", "sample.num_batches_per_epoch", "sample.sde", "sample.noise_level", "sample.sde_window",
    "sample.eta",
    "train.batch_size", "train.gradient_accumulation_steps", "train.num_inner_epochs", "train.max_grad_norm", "train.cfg",
    "train.adam_beta1", "train.adam_beta2", "train.adam_weight_decay", "train.adam_epsilon",
    "rebel.eta", "rebel.target", "rebel.mu", "rebel.mix.policy", "rebel.mix.base", "rebel.mix.offline",
    "rebel.offline_data", "ppo.clip_range", "ppo.adv_clip_max", "rloo.k", "rloo.clip_range",
    "grpo.k", "grpo.clip_range", "grpo.adv_clip_max", "grpo.eps", "dpo.beta",
    "stat_tracker.buffer_size", "stat_tracker.min_count",
})
# What may change on resume, and takes effect from the first resumed epoch: the length of the run, the learning rate
# and its schedule (rebuilt at the restored optimizer-step count), where and how often it saves and logs, evaluation,
# the sample grids, and knobs that trade memory for time without changing the numbers.
RESUMABLE_KEYS = frozenset({
    "num_epochs", "logdir", "run_name", "resume_from", "save_freq", "num_checkpoint_limit", "log_with",
    "collective_timeout_s", "kl_log_samples",
    "reward.batch_size", "reward.reward_batch_size", "reward.max_concurrency", "reward.timeout_s", "reward.retries",
    # Where the judge runs and the name of its key's variable: the same model elsewhere scores the same.
    "reward.judge.base_url", "reward.judge.api_key_env",
    "preference.batch_size", "preference.max_concurrency", "preference.timeout_s", "preference.retries",
    "sample.decode_batch_size", "sample.overlap_reward",
    "train.learning_rate", "train.lr_schedule", "train.lr_warmup_steps", "train.gradient_checkpointing",
    "grid.num_prompts", "grid.num_seeds", "grid.seed",
    "eval.prompt_file", "eval.every", "eval.num_seeds", "eval.seed", "eval.rewards",
})
ALGORITHM_SECTIONS = {"rebel": "rebel", "ppo": "ppo", "rloo": "rloo", "grpo": "grpo", "online_dpo": "dpo",
                      "rebel_preference": "rebel"}


class TrainingProgress:
    """Where the run is, saved as `checkpoint.json` so that a resumed run continues exactly."""

    def __init__(self) -> None:
        self.epoch = 0
        self.reward_queries = 0
        self.optimizer_steps = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


# ---- Finding ----

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


def resumed_run_dir(config: ConfigDict, checkpoint: Path | None) -> Path | None:
    """The folder of the run `resume_from` continues (None for a fresh run)."""
    if not config.resume_from:
        return None
    return checkpoint.parent.parent if checkpoint is not None else Path(config.resume_from)


def finished_epochs(checkpoint: Path) -> int:
    """The epochs a checkpoint's run had done; a `ConfigError` naming the file when it cannot be read."""
    path = checkpoint / CHECKPOINT_FILE
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = f"{type(e).__name__}: {str(e)[:80]}"
        raise ConfigError(f"checkpoint file {path} is damaged ({detail}){_earlier_offer(checkpoint)}") from None


# ---- Verifying ----

def _earlier_offer(checkpoint: Path) -> str:
    """The end of a damaged-checkpoint line: the previous complete checkpoint to resume from, if there is one."""
    earlier = [c for c in complete_checkpoints(checkpoint.parent.parent) if c.name < checkpoint.name]
    return (f"; resume from the previous one with --config.resume_from={earlier[-1]}" if earlier
            else "; no earlier checkpoint exists")


def verify_checkpoint(checkpoint: Path) -> None:
    """Read every file of a checkpoint before any of it is loaded, so that a damaged file (a truncated optimizer state,
    LoRA weights or stat tracker) stops the resume with one line instead of training from a half-loaded state. Pickles
    are read as data only: one that holds any other object is refused, never run."""
    offer = _earlier_offer(checkpoint)
    for file in sorted(checkpoint.iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix in (".bin", ".pkl", ".pt"):
                safe_load(file, map_location="cpu")
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except pickle.UnpicklingError as e:
            if "weights only load failed" not in str(e).lower():
                raise ConfigError(f"checkpoint file {file} is damaged (unpickling failed){offer}") from None
            raise ConfigError(f"checkpoint file {file} is refused: it holds objects other than tensors and plain data, "
                              f"and loading them could run code{offer}") from None
        except Exception as e:  # every loader has its own error types; any of them means the file is unreadable
            detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise ConfigError(f"checkpoint file {file} is damaged ({detail}){offer}") from None
    if not (checkpoint / STAT_TRACKER_FILE).is_file() and not any(LEGACY_STATE.fullmatch(f.name)
                                                                   for f in checkpoint.iterdir()):
        raise ConfigError(f"checkpoint {checkpoint} has no {STAT_TRACKER_FILE}: it is incomplete{offer}")


# ---- Compatibility ----

def flat_config(config: ConfigDict) -> dict[str, Any]:
    """`{"a.b": value}` as the config reads back from its JSON (tuples as lists, placeholders as None)."""
    return flatten(json.loads(config.to_json_best_effort()))


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The flat config that wrote a checkpoint: its own copy, else (a checkpoint of an older version) its run folder's
    config.json; None when neither exists."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        if not _is_run_folder(checkpoint.parent.parent):
            return None
        path = checkpoint.parent.parent / "config.json"
    try:
        return flatten(json.loads(path.read_text()))
    except ValueError as e:
        raise ConfigError(f"{path} is damaged ({e})") from None


def _changes(old: dict[str, Any], new: dict[str, Any], keys: set[str] | frozenset[str]) -> list[str]:
    """`key: old -> new` for each key of `keys` whose value differs (keys the old config lacks are not compared)."""
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new if key in keys and key in old and old[key] != new[key]]


def check_resumable(config: ConfigDict, checkpoint: Path) -> list[str]:
    """Raise a one-line `ConfigError` listing every key that defines the run and differs from the checkpoint's (and a
    `num_epochs` below the epochs done); return the resumable keys that changed, as `key: old -> new`."""
    old, new = saved_config(checkpoint), flat_config(config)
    done = finished_epochs(checkpoint)
    if config.num_epochs < done:
        raise ConfigError(f"num_epochs={config.num_epochs} is below the {done} epochs checkpoint {checkpoint} has done")
    if old is None:
        return []
    old.setdefault("reward.aggregate", "sum")  # what a checkpoint from before the key existed did
    old.setdefault("train.cfg", True)  # likewise: guidance as the pipeline runs it
    sections = set(ALGORITHM_SECTIONS.values())
    kept = {ALGORITHM_SECTIONS.get(old.get("algorithm")), ALGORITHM_SECTIONS.get(new["algorithm"])}
    defining = {key for key in new if key not in RESUMABLE_KEYS
                and not (key.split(".")[0] in sections and key.split(".")[0] not in kept)}
    changed = _changes(old, new, defining)
    if changed:
        raise ConfigError(f"cannot resume {checkpoint}: these keys define the run and differ from the checkpoint's "
                          f"(checkpoint -> now): {'; '.join(changed)}; resume with the checkpoint's values or start a "
                          "new run")
    return _changes(old, new, RESUMABLE_KEYS - {"resume_from"})


# ---- Saving and loading ----

def lora_hooks(accelerator: Accelerator, policy: Any) -> None:
    """Checkpoint only the trainable (LoRA) weights, in the policy's own format, instead of the whole network."""

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
                    config: ConfigDict | None = None, metrics: dict[str, Any] | None = None,
                    stat_tracker: Any = None) -> Path:
    """Write the full training state to `checkpoints/epoch_NNNN` atomically: into a temporary folder, then renamed.

    A crash while writing leaves only the temporary folder behind; earlier checkpoints stay intact. With `config`, the
    folder gets a copy of it and a model card (README.md) so that it uploads to a model hub as a proper page.
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
                (tmp / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
            if stat_tracker is not None:  # identical on every process: the targets are computed on all rewards
                (tmp / STAT_TRACKER_FILE).write_text(json.dumps(stat_tracker.state_dict()))
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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, progress: TrainingProgress, stat_tracker: Any) -> None:
    """Restore what `save_checkpoint` wrote. The JSON states are read here; accelerate restores the rest, its pickles
    as data only. A checkpoint of an older version holds the states as accelerate's custom_checkpoint_N.pkl, which
    accelerate would unpickle as objects: they are read as data here, and accelerate is shown the folder without them."""
    legacy = sorted(f for f in checkpoint.iterdir() if LEGACY_STATE.fullmatch(f.name))
    if not legacy:
        accelerator.load_state(str(checkpoint))
        stat_tracker.load_state_dict(json.loads((checkpoint / STAT_TRACKER_FILE).read_text()))
    else:
        with tempfile.TemporaryDirectory() as view:
            for file in checkpoint.iterdir():
                if file not in legacy:
                    os.symlink(file.resolve(), Path(view) / file.name)
            accelerator.load_state(view)
        stat_tracker.load_state_dict(safe_load(checkpoint / "custom_checkpoint_0.pkl", map_location="cpu"))
    progress.load_state_dict(json.loads((checkpoint / CHECKPOINT_FILE).read_text()))


# ---- Metrics files of a resumed run ----

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
