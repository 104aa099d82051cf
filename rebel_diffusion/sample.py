"""Sample from a trained checkpoint (or a base model): `python -m rebel_diffusion.sample --checkpoint DIR --out DIR`.

The policy is rebuilt from the run's `config.json` exactly as training built it, then the checkpoint's LoRA weights
are loaded. Images: one PNG per (prompt, seed) plus `grid.png` (rows = prompts, upscaled, each column headed by
"base" or "fine-tuned" and its seed); with `--compare-base` the base model's image for the same seed (the same network
with the adapter disabled, so the model is loaded once) is written beside each fine-tuned one. Text: `samples.jsonl`, one line per (prompt, seed), with `base_response` under
`--compare-base`.

With `--compare-base --preference NAME` a pairwise preference (`rebel_diffusion.rewards.preference`) judges each
(prompt, seed): P(fine-tuned beats base) on the same seed. Their mean is the win rate against the base model, with a
95% confidence interval that takes the prompts as the independent units (`win_rate`), printed as one line and written
to `win_rate.json`. The preference's options are the run's `preference` section, overridden by `--preference-option
KEY=VALUE`; it is checked and built before the policy loads.

With `--save-trajectories` every (prompt, seed)'s trajectory (for images the latents of each step and the image; for
text the tokens) is written to `trajectories.pt` too: offline data for a later run (`rebel.mu = "offline"`,
`rebel.offline_data = ".../trajectories.pt"`), whose model and sampler settings must be the ones it was sampled with.

Each (prompt, seed) is sampled on its own, so its output depends only on the prompt and the seed, never on which other
prompts were asked for. Bad inputs (no LoRA weights, weights that do not fit the model, a missing prompt file) exit
with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ml_collections import ConfigDict
from PIL import Image

from rebel_diffusion.grids import save_image_grid
from rebel_diffusion.policies import POLICIES, Policy, adapter_disabled, make_policy, policy_class
from rebel_diffusion.checkpoints import find_checkpoint
from rebel_diffusion.compare import mean_ci
from rebel_diffusion.rewards import RewardSetupError
from rebel_diffusion.rewards.preference import (PreferenceFn, check_preference_config, make_preference_fn,
                                                section_options)
from rebel_diffusion.sources import save_trajectories
from rebel_diffusion.trainer import DTYPES, ConfigError, read_prompts
from rebel_diffusion.trajectory import Trajectory

# What a checkpoint folder holds for each policy: the diffusers LoRA file, a peft adapter, or (LoRA rank 0) full weights.
LORA_FILES = {"lcm": ("pytorch_lora_weights.safetensors",), "flow_match": ("pytorch_lora_weights.safetensors",),
              "ddim": ("pytorch_lora_weights.safetensors",),
              "causal_lm": ("adapter_model.safetensors", "model.safetensors")}
DEFAULT_PROMPTS = ["a photograph of an astronaut riding a horse"]


class SampleError(Exception):
    """A user input problem, reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become `SampleError` (one line, exit 2) instead of usage text plus `sys.exit`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SampleError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m rebel_diffusion.sample`."""
    parser = _Parser(prog="python -m rebel_diffusion.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint folder <run>/checkpoints/epoch_NNNN, or a run folder (its "
                                             "latest checkpoint); without it, the base model of --model")
    parser.add_argument("--out", required=True, help="folder to write the samples to")
    parser.add_argument("--model", help="the base model (Hub id or folder); default: the run's model.pretrained")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="lcm",
                        help="the policy without --checkpoint (with one, the run's)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", nargs="+", help="prompts to sample")
    prompts.add_argument("--prompt-file", help="a prompt file (text, JSONL or dataset, as for training)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one sample per prompt and seed")
    parser.add_argument("--compare-base", action="store_true", help="also sample the base model with the same seeds")
    parser.add_argument("--resolution", type=int, help="image side in pixels; default: the run's")
    parser.add_argument("--save-trajectories", action="store_true",
                        help="also write trajectories.pt: every (prompt, seed)'s trajectory (for images the latents of "
                             "each step and the image), offline data for a run's rebel.offline_data")
    parser.add_argument("--preference", help="with --compare-base: the preference judging fine-tuned against base "
                                             "(pickscore, hpsv2, bradley_terry, module:function or http://host:port); "
                                             "writes win_rate.json")
    parser.add_argument("--preference-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a preference option over the run's preference section (repeatable; the value is read "
                             "as JSON when it parses, e.g. temperature=0.1, else as a string, e.g. reward=large_shape)")
    return parser


def load_run_config(checkpoint: Path) -> ConfigDict:
    """The resolved config `<run>/config.json` of the run that wrote `checkpoint` (`<run>/checkpoints/epoch_NNNN`)."""
    path = checkpoint.parent.parent / "config.json"
    if not path.is_file():
        raise SampleError(f"{path} not found: {checkpoint} is not inside a run folder written by the trainer")
    try:
        return ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise SampleError(f"{path} is not valid JSON ({e})") from None


def base_config(model: str, policy: str) -> ConfigDict:
    """The trainer's defaults (configs/base.py, importable from the repository root) for `model` without a checkpoint."""
    try:
        from configs.base import get_config
    except ImportError:
        raise SampleError("without --checkpoint the defaults come from the repository's configs/base.py; run from the "
                          "repository root") from None

    config = get_config()
    config.model.pretrained = model
    config.policy = policy
    return config


def load_checkpoint_weights(policy: Policy, checkpoint: Path) -> None:
    """`policy.load_lora(checkpoint)`, refusing weights that do not fit and weights that load nothing.

    diffusers' loader silently skips keys with an unknown prefix, so success is checked by its effect: at least one of
    the policy's trainable tensors must have changed.
    """
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    try:
        policy.load_lora(checkpoint)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise SampleError(f"cannot load the LoRA weights of {checkpoint}: {_one_line(e)}") from None
    if all(torch.equal(old, new.detach()) for old, new in zip(before, policy.trainable_parameters())):
        raise SampleError(f"the LoRA weights in {checkpoint} match none of this model's adapter layers "
                          "(wrong key prefix or another model's LoRA)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _resolve_checkpoint(path: str) -> Path:
    try:
        return find_checkpoint(path)
    except ConfigError:
        raise SampleError(f"--checkpoint {path!r} is neither a checkpoint folder nor a run folder with checkpoints") \
            from None


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        try:
            return read_prompts(args.prompt_file, key="--prompt-file")
        except ConfigError as e:
            raise SampleError(str(e)) from None
    return args.prompts or DEFAULT_PROMPTS


def _sample_images(policy: Policy, prompts: list[str], seeds: list[int], out: Path, compare_base: bool,
                   trajectories: list[Trajectory], tuned: bool = True) -> tuple[list, list]:
    """One PNG per (prompt, seed) (and its `_base` twin), `grid.png` (rows = prompts; a column per seed, or a
    base | fine-tuned pair of columns per seed, each labelled in the header band), and `samples.json` mapping files to
    prompts and seeds. Returns the fine-tuned and the base images (none without `compare_base`), prompt by prompt and
    seed by seed, and appends each fine-tuned trajectory to `trajectories`."""
    def draw(prompt: str, seed: int) -> torch.Tensor:
        return policy.sample([prompt], generator=torch.Generator().manual_seed(seed)).outputs[0].cpu()

    def draw_tuned(prompt: str, seed: int) -> torch.Tensor:
        trajectory = policy.sample([prompt], generator=torch.Generator().manual_seed(seed))
        trajectories.append(trajectory)
        return trajectory.outputs[0].cpu()

    rows, index, tuned_images, base_images = [], [], [], []
    for i, prompt in enumerate(prompts):
        row = []
        for seed in seeds:
            entry = {"prompt": prompt, "seed": seed, "file": f"p{i:03d}_s{seed}.png"}
            if compare_base:
                with adapter_disabled(policy):
                    base = draw(prompt, seed)
                entry["base_file"] = f"p{i:03d}_s{seed}_base.png"
                _save_png(base, out / entry["base_file"])
                row.append(base)
                base_images.append(base)
            image = draw_tuned(prompt, seed)
            _save_png(image, out / entry["file"])
            row.append(image)
            tuned_images.append(image)
            index.append(entry)
        rows.append(torch.stack(row))
    names = ("base", "fine-tuned") if compare_base else ("fine-tuned" if tuned else "base",)
    columns = [f"{name}\nseed {seed}" for seed in seeds for name in names]
    save_image_grid(torch.stack(rows), prompts, out / "grid.png", column_labels=columns)
    (out / "samples.json").write_text(json.dumps(index, indent=2))
    return tuned_images, base_images


def _save_png(image: torch.Tensor, path: Path) -> None:
    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)


def _sample_text(policy: Policy, prompts: list[str], seeds: list[int], out: Path,
                 compare_base: bool, trajectories: list[Trajectory]) -> tuple[list, list]:
    """`samples.jsonl`: `{"prompt", "seed", "response"[, "base_response"]}` per (prompt, seed). Returns the fine-tuned
    and the base responses (none without `compare_base`), prompt by prompt and seed by seed, and appends each
    fine-tuned trajectory to `trajectories`."""
    records = []
    for prompt in prompts:
        for seed in seeds:
            record = {"prompt": prompt, "seed": seed}
            trajectories.append(policy.sample([prompt], generator=torch.Generator().manual_seed(seed)))
            record["response"] = trajectories[-1].outputs[0]
            if compare_base:
                with adapter_disabled(policy):
                    record["base_response"] = policy.sample([prompt],
                                                            generator=torch.Generator().manual_seed(seed)).outputs[0]
            records.append(record)
    (out / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return [r["response"] for r in records], [r["base_response"] for r in records if "base_response" in r]


def _parse_option(text: str) -> tuple[list[str], Any]:
    """`KEY=VALUE` -> (the dotted key's parts, the value read as JSON when it parses, else the string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SampleError(f"--preference-option {text!r} is not KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().split("."), parsed


def _preference_section(config: ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
    """The run's `preference` section (empty for a run written before it existed), named `--preference` and overridden
    by each `--preference-option` (a dotted key sets a nested section's option: `judge.model=...`)."""
    section = {**section_options(config.get("preference")), "name": args.preference}
    for text in args.preference_option:
        parts, value = _parse_option(text)
        node = section
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise SampleError(f"--preference-option {text!r}: {part!r} is an option, not a section")
            node = node[part]
        node[parts[-1]] = value
    return section


def _build_preference(section: dict[str, Any], policy_kind: str, device: torch.device,
                      dtype: torch.dtype) -> PreferenceFn:
    """The checked and built preference of `section`, before the policy loads (a bad name or model path, or a server
    that does not answer, costs no sampling); `SampleError` (one line) otherwise."""
    name = section["name"]
    try:
        check_preference_config(section, policy_kind)
        preference_fn = make_preference_fn(name, device=device, dtype=dtype,
                                           **{k: v for k, v in section.items() if k != "name"})
    except (ValueError, RewardSetupError) as e:
        raise SampleError(f"--preference {name!r}: {_one_line(e)}") from None
    served = getattr(preference_fn, "served_kind", "any")
    if served not in ("any", policy_kind):
        raise SampleError(f"--preference {name!r}: the server compares {served} outputs (its /health), but the policy "
                          f"produces {policy_kind}")
    return preference_fn


def win_rate(probabilities: np.ndarray, level: float = 0.95) -> tuple[float, tuple[float, float] | None]:
    """The win rate of `(prompts, seeds)` probabilities P(fine-tuned beats base) and its `level` confidence interval.

    The seeds of one prompt are not independent draws (a prompt the fine-tuned model handles well wins on most of its
    seeds), so the prompts are the units: the interval is Student-t over the per-prompt mean probabilities,
    `mean +- t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`, clipped to [0, 1] (a rate lies there). None for one prompt,
    whose seeds alone cannot say how the rate varies across prompts.
    """
    mean, low, high = mean_ci(probabilities.mean(axis=1), level)
    if math.isnan(low):
        return mean, None
    return mean, (max(0.0, low), min(1.0, high))


def _report_win_rate(preference_fn: PreferenceFn, name: str, prompts: list[str], seeds: list[int], tuned: Any,
                     base: Any, out: Path) -> None:
    """Judge every (prompt, seed) pair, print the win rate in one line and write `win_rate.json`."""
    pair_prompts = [prompt for prompt in prompts for _ in seeds]
    stack = torch.stack if isinstance(tuned[0], torch.Tensor) else list
    with torch.no_grad():
        probabilities = preference_fn(pair_prompts, stack(tuned), stack(base)).double().cpu().numpy()
    probabilities = probabilities.reshape(len(prompts), len(seeds))
    rate, interval = win_rate(probabilities)
    (out / "win_rate.json").write_text(json.dumps({
        "preference": name,
        "win_rate": rate,
        "ci95": list(interval) if interval else None,
        "interval": "Student-t over the per-prompt mean probabilities, clipped to [0, 1]",
        "num_prompts": len(prompts),
        "num_seeds": len(seeds),
        "per_prompt": [{"prompt": prompt, "win_rate": float(row.mean())}
                       for prompt, row in zip(prompts, probabilities)],
        "pairs": [{"prompt": prompt, "seed": seed, "p_fine_tuned_beats_base": float(p)}
                  for prompt, row in zip(prompts, probabilities) for seed, p in zip(seeds, row)],
    }, indent=2))
    ci = f"95% CI [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "no 95% CI (it needs at least 2 prompts)"
    print(f"win rate against the base model: {rate:.3f}, {ci}, over {len(prompts)} prompts x {len(seeds)} seeds "
          f"(preference {name!r}; {out / 'win_rate.json'})")


def run(args: argparse.Namespace) -> Path:
    """Sample as `args` say; returns the output folder. Raises `SampleError` for bad inputs."""
    checkpoint = _resolve_checkpoint(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None:
        config = load_run_config(checkpoint)
        names = LORA_FILES.get(config.policy, ())
        if names and not any((checkpoint / name).is_file() for name in names):
            raise SampleError(f"checkpoint {checkpoint} holds no LoRA weights ({' or '.join(names)})")
        if args.model:
            config.model.pretrained = args.model
    elif not args.model:
        raise SampleError("--model is required without --checkpoint")
    elif args.compare_base:
        raise SampleError("--compare-base needs --checkpoint: without one the model is the base model")
    else:
        config = base_config(args.model, args.policy)
    if args.preference is not None and not args.compare_base:
        raise SampleError("--preference judges the fine-tuned model against the base model: add --compare-base")
    if args.preference_option and args.preference is None:
        raise SampleError("--preference-option needs --preference")
    if args.resolution:
        config.resolution = args.resolution
    prompts = _prompts(args)
    # A policy whose weights are not loaded from a checkpoint must equal the base model: peft's default init (True)
    # starts LoRA B at zero. The field is typed str ("gaussian"), so the section is replaced rather than assigned to.
    config.lora = ConfigDict({**config.lora.to_dict(), "init": True})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(config.get("mixed_precision", "no"), torch.float32) if device.type == "cuda" else torch.float32
    section = _preference_section(config, args) if args.preference is not None else None
    preference_fn = None if section is None else _build_preference(section, policy_class(config.policy).kind, device,
                                                                   dtype)
    try:
        policy = make_policy(config, device, dtype)
    except (FileNotFoundError, ValueError) as e:
        raise SampleError(f"cannot build the model: {_one_line(e)}") from None
    try:
        policy.check_prompts(prompts)
    except ValueError as e:
        raise SampleError(str(e)) from None
    if checkpoint is not None:
        load_checkpoint_weights(policy, checkpoint)
    if args.compare_base and not policy.has_reference:
        raise SampleError("--compare-base needs a LoRA adapter; this checkpoint holds full weights (lora.rank=0)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trajectories: list[Trajectory] = []
    if policy.kind == "image":
        tuned, base = _sample_images(policy, prompts, list(args.seeds), out, args.compare_base, trajectories,
                                     tuned=checkpoint is not None)
    else:
        tuned, base = _sample_text(policy, prompts, list(args.seeds), out, args.compare_base, trajectories)
    if args.save_trajectories:
        save_trajectories(out / "trajectories.pt", Trajectory.cat(trajectories), config)
    if preference_fn is not None:
        _report_win_rate(preference_fn, section["name"], prompts, list(args.seeds), tuned, base, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, or 2 with one line on stderr for bad inputs)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars on stderr would bury the one-line error a bad input gets.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        out = run(build_parser().parse_args(argv))
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"samples written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
