"""Performance ratios, each measured within one run: the samplers (LCM, flow matching, text) against their libraries,
each algorithm's update against its floor of denoiser passes, update memory against the horizon, an epoch against its floor, and an epoch with its
reward served by another process against in-process.

    OMP_NUM_THREADS=1 python benchmarks/bench.py              # tiny LCM + SD-1.5-shaped UNet at 64 px, CPU
    OMP_NUM_THREADS=1 python benchmarks/bench.py --sd-resolution 256   # the SD-1.5-shaped section at 256 px
    python benchmarks/bench.py --quick                         # the smoke test: tiny models, one round, batch 2
    python benchmarks/bench.py --device cuda --full-size       # SD-1.5-shaped at 768 px on a GPU (unverified)

Timings are taken round-robin over `--repeats` rounds (one of each case, then again), so that the drift of a shared
machine hits every case alike. Each row's ratio is computed round by round (the cases of one round against each other),
and reported as the median of the per-round ratios with their spread, min to max. A target counts as met only when the
whole spread is inside it. The markdown table is printed row by row as each is measured (and appended to `--out FILE`
when given).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` is a folder of the repository, not part of the installed package

from accelerate import Accelerator  # noqa: E402
from diffusers import (AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusion3Pipeline,  # noqa: E402
                       UNet2DConditionModel)
from ml_collections import ConfigDict  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from configs.base import get_config  # noqa: E402
from rebel_diffusion.algorithms import ALGORITHMS  # noqa: E402
from rebel_diffusion.policies.causal_lm import CausalLMPolicy  # noqa: E402
from rebel_diffusion.policies.flow_match import FlowMatchPolicy, absent_components  # noqa: E402
from rebel_diffusion.policies.lcm import LCMPolicy, merged_lora, peak_memory_mb  # noqa: E402
from rebel_diffusion.rewards import make_reward_fn, register_reward  # noqa: E402
from rebel_diffusion.serve_reward import serve_in_subprocess  # noqa: E402
from rebel_diffusion.tokenizer import build_clip_tokenizer  # noqa: E402
from rebel_diffusion.trainer import pair_loss_gradients, step_loss_gradients, train  # noqa: E402
from rebel_diffusion.trajectory import Trajectory  # noqa: E402

TINY_LCM = REPO / "assets" / "tiny-lcm"
TINY_LM = REPO / "assets" / "tiny-lm"
TINY_FLOW = REPO / "assets" / "tiny-flow"
PROMPT = "a red circle on a white background"
Row = tuple[str, str, float, str, str]  # model, measurement, ratio (a `Ratio` when timed in rounds), detail, target


class Timing(float):
    """A case's seconds: the median over its rounds (the float value), with every round's seconds in `rounds`.

    Arithmetic acts round by round, so that a floor built from several cases (`T * pass + decode`) is that sum in each
    round, and dividing two timings gives a `Ratio` of per-round ratios. A plain number acts on every round alike.
    """

    rounds: tuple[float, ...]

    def __new__(cls, rounds: list[float] | tuple[float, ...]) -> Timing:
        if not rounds:
            raise ValueError("a timing needs at least one round")
        timing = super().__new__(cls, statistics.median(rounds))
        timing.rounds = tuple(float(r) for r in rounds)
        return timing

    def _pairs(self, other: object) -> list[tuple[float, float]] | None:
        if isinstance(other, Timing):
            if len(other.rounds) != len(self.rounds):
                raise ValueError(f"timings of {len(self.rounds)} and {len(other.rounds)} rounds do not pair up")
            return list(zip(self.rounds, other.rounds))
        if isinstance(other, (int, float)):
            return [(r, float(other)) for r in self.rounds]
        return None

    def __add__(self, other: object) -> Timing:
        pairs = self._pairs(other)
        return NotImplemented if pairs is None else Timing([a + b for a, b in pairs])

    __radd__ = __add__

    def __mul__(self, other: object) -> Timing:
        if isinstance(other, Timing):
            return NotImplemented  # seconds squared mean nothing here
        pairs = self._pairs(other)
        return NotImplemented if pairs is None else Timing([a * b for a, b in pairs])

    __rmul__ = __mul__

    def __truediv__(self, other: object) -> Timing | Ratio:
        pairs = self._pairs(other)
        if pairs is None:
            return NotImplemented
        quotients = [a / b for a, b in pairs]
        return Ratio(quotients) if isinstance(other, Timing) else Timing(quotients)


class Ratio(float):
    """A ratio measured in rounds: the median of the per-round ratios (the float value), `low` and `high` their min and
    max, `rounds` all of them."""

    rounds: tuple[float, ...]

    def __new__(cls, rounds: list[float] | tuple[float, ...]) -> Ratio:
        if not rounds:
            raise ValueError("a ratio needs at least one round")
        ratio = super().__new__(cls, statistics.median(rounds))
        ratio.rounds = tuple(float(r) for r in rounds)
        return ratio

    @property
    def low(self) -> float:
        return min(self.rounds)

    @property
    def high(self) -> float:
        return max(self.rounds)


def spread(ratio: float) -> tuple[float, float]:
    """The min and max of a ratio over its rounds; a single measurement (a plain float) is its own spread."""
    return (ratio.low, ratio.high) if isinstance(ratio, Ratio) else (float(ratio), float(ratio))


def verdict(ratio: float, target: str) -> str:
    """"met" when the ratio's whole spread satisfies `target` ("<= 1.05", "< 1"), "not met" when its median does not,
    and "not met (spread crosses it)" when the median does but some round does not; "" without a target. A timing of
    a single round has no spread to judge: "no verdict (one round)". A plain float is an exact count (memory), judged
    as it is."""
    if not target:
        return ""
    if isinstance(ratio, Ratio) and len(ratio.rounds) < 2:
        return "no verdict (one round)"
    operator, bound = target.split()
    holds = {"<=": lambda x: x <= float(bound), "<": lambda x: x < float(bound),
             ">=": lambda x: x >= float(bound), ">": lambda x: x > float(bound)}[operator]
    low, high = spread(ratio)
    if holds(low) and holds(high):  # every target is one-sided: the extremes decide for the whole spread
        return "met"
    return "not met (spread crosses it)" if holds(float(ratio)) else "not met"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def medians(cases: dict[str, Callable[[], object]], repeats: int, device: torch.device,
            warm_up: bool = True) -> dict[str, Timing]:
    """Seconds per case over `repeats` round-robin rounds, after one untimed warm-up call of each (unless not
    `warm_up`): a `Timing` each, whose value is the median and whose ratios to the other cases are taken round by
    round."""
    for run in cases.values() if warm_up else ():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: Timing(values) for name, values in times.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


# ---- Models ----


def perturb_lora(policy: LCMPolicy | FlowMatchPolicy) -> None:
    """Make the LoRA non-zero (its B starts at 0), so that merged and unmerged sampling both do real work."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator).to(param.device))


def tiny_pipeline(device: torch.device) -> LatentConsistencyModelPipeline:
    """The shipped tiny LCM (trained at 32 px), as a plain pipeline without LoRA."""
    pipeline = LatentConsistencyModelPipeline.from_pretrained(TINY_LCM, safety_checker=None,
                                                              requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def sd15_pipeline(resolution: int, full_size: bool, device: torch.device,
                  dtype: torch.dtype) -> LatentConsistencyModelPipeline:
    """LCM Dreamshaper v7's UNet shape (SD-1.5 blocks, 768-d cross-attention, 256-d w-embedding) with random weights.

    The VAE and text encoder are tiny unless `full_size` (then SD-1.5's shapes too): they do not change the UNet's
    cost, and the CPU run cannot afford them. The same seed gives the same weights at every call.
    """
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:  # the tokenizer is read into memory; its files are not kept
        tokenizer = build_clip_tokenizer(Path(folder), model_max_length=77)
    layers, intermediate = (12, 3072) if full_size else (1, 768)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae_channels, vae_layers, vae_groups = ((128, 256, 512, 512), 2, 32) if full_size else ((16, 16, 16, 16), 1, 8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels, layers_per_block=vae_layers,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=vae_groups, sample_size=resolution, scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, time_cond_proj_dim=256,
    )
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    pipeline = LatentConsistencyModelPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def lora_policy(pipeline: LatentConsistencyModelPipeline, num_steps: int, resolution: int) -> LCMPolicy:
    """A policy with a non-zero LoRA on its own copy of `pipeline`'s UNet and scheduler, sharing the VAE and text
    encoder: LoRA layers go into the UNet they wrap, so `pipeline` stays bare and several horizons can coexist."""
    parts = dict(pipeline.components, unet=copy.deepcopy(pipeline.unet), scheduler=copy.deepcopy(pipeline.scheduler))
    own = LatentConsistencyModelPipeline(**parts, requires_safety_checker=False)
    own.set_progress_bar_config(disable=True)
    policy = LCMPolicy(own, num_steps=num_steps, resolution=resolution, device=pipeline.device, dtype=pipeline.dtype)
    perturb_lora(policy)
    return policy


# ---- (a) sampling ----


def sampler_rows(name: str, policy: LCMPolicy, bare: LatentConsistencyModelPipeline, batch: int, repeats: int) -> list[Row]:
    """`LCMPolicy.sample` against `LatentConsistencyModelPipeline.__call__` on the same UNet, prompts and seed: the
    pipeline without LoRA (`bare`) and the policy's own pipeline, whose UNet carries the LoRA unmerged; and against
    itself with the LoRA left unmerged (`merge_for_sampling` off), which judges whether merging pays.

    The merged weights are kept between calls while the LoRA is unchanged, as between two optimizer steps; the
    "re-merging" case changes the LoRA's values before each call, as the first sampling batch after an optimizer step
    sees them: it negates A and B, which leaves the delta B @ A (and so the images) bit for bit the same.
    """
    prompts = [PROMPT] * batch
    side = policy.resolution

    def pipeline_call(pipeline: LatentConsistencyModelPipeline) -> Callable[[], object]:
        return lambda: pipeline(prompts, num_inference_steps=policy.num_steps, guidance_scale=policy.guidance_scale,
                                generator=torch.Generator().manual_seed(0), output_type="pt", height=side, width=side)

    def sample(merge: bool = True, change_lora: bool = False) -> Callable[[], object]:
        def run() -> object:
            if change_lora:
                with torch.no_grad():
                    for param in policy.trainable_parameters():
                        param.neg_()
            merging, policy.merge_for_sampling = policy.merge_for_sampling, policy.merge_for_sampling and merge
            try:
                return policy.sample(prompts, generator=torch.Generator().manual_seed(0))
            finally:
                policy.merge_for_sampling = merging

        return run

    times = medians({
        "sampler": sample(),
        "bare": pipeline_call(bare),
        "lora": pipeline_call(policy.pipeline),
        "unmerged": sample(merge=False),
        "re-merging": sample(change_lora=True),
    }, repeats, policy.device)
    where = f"batch {batch}, {policy.num_steps} steps, {side} px"
    return [
        (name, f"`LCMPolicy.sample` / bare `LatentConsistencyModelPipeline` ({where})", times["sampler"] / times["bare"],
         f"{ms(times['sampler'])} / {ms(times['bare'])}", "<= 1.0"),
        (name, f"`LCMPolicy.sample` / the pipeline with the same LoRA loaded ({where})", times["sampler"] / times["lora"],
         f"{ms(times['sampler'])} / {ms(times['lora'])}", "<= 1.0"),
        (name, f"`LCMPolicy.sample` / the same with the LoRA unmerged ({where})", times["sampler"] / times["unmerged"],
         f"{ms(times['sampler'])} / {ms(times['unmerged'])}", "<= 1.0"),
        (name, f"`LCMPolicy.sample` re-merging (LoRA changed since the last call) / bare ({where})",
         times["re-merging"] / times["bare"], f"{ms(times['re-merging'])} / {ms(times['bare'])}", ""),
    ]


# ---- (b) updates against their floor ----


def algorithm_config(algorithm: str) -> ConfigDict:
    """The base config for `algorithm`, one group (REBEL/DPO: one pair) per micro-batch, no KL loss term."""
    config = get_config()
    config.algorithm = algorithm
    config.train.batch_size = 1
    return config


def unet_forward_backward(policy: LCMPolicy, trajectory: Trajectory) -> Callable[[], None]:
    """One forward and backward of the UNet (LoRA unmerged, as in training) on the trajectory's first state."""
    t = policy.timesteps[0]
    state = trajectory.states[:, 0].to(policy.dtype)
    w = policy.w_embedding.expand(len(state), -1)

    def run() -> None:
        # The same autocast as `LCMPolicy.log_prob`, so that a half-precision floor is the training pass.
        with torch.autocast(policy.device.type, dtype=policy.dtype, enabled=policy.dtype != torch.float32):
            output = policy.model(state, t, timestep_cond=w, encoder_hidden_states=trajectory.conditioning,
                                  return_dict=False)[0]
        output.float().mean().backward()
        clear_gradients(policy)

    return run


def clear_gradients(policy: LCMPolicy) -> None:
    for param in policy.trainable_parameters():
        param.grad = None


def update_call(accelerator: Accelerator, policy: LCMPolicy, algorithm: str, trajectory: Trajectory) -> Callable[[], None]:
    """One call of the trainer's gradient function for `algorithm` on one micro-batch."""
    config, record = algorithm_config(algorithm), ALGORITHMS[algorithm]
    targets = torch.linspace(-1, 1, len(trajectory), device=policy.device)

    def run() -> None:
        if record.pair_loss is not None:
            pair_loss_gradients(accelerator, policy, record, trajectory, targets, config)
        else:
            step_loss_gradients(accelerator, policy, record, trajectory, targets, config, inner_epoch=0)
        clear_gradients(policy)

    return run


def update_rows(name: str, policy: LCMPolicy | FlowMatchPolicy, accelerator: Accelerator, algorithms: list[str],
                repeats: int, floor_pass: Callable[..., Callable[[], None]] | None = None) -> list[Row]:
    """Each algorithm's update on one micro-batch against T denoiser forward+backward passes on its samples (the
    floor), T the policy's stochastic steps; `floor_pass(policy, trajectory)` times one pass (the LCM UNet's unless
    given)."""
    floor_pass = floor_pass or unet_forward_backward
    # A micro-batch holds the samples that train: a whole group, but preference REBEL's comparator y''.
    sizes = {a: ALGORITHMS[a].trained_samples or ALGORITHMS[a].group_size(algorithm_config(a)) for a in algorithms}
    trajectories = {k: policy.sample([PROMPT] * k, generator=torch.Generator().manual_seed(k)) for k in set(sizes.values())}
    cases = {f"pass{k}": floor_pass(policy, trajectory) for k, trajectory in trajectories.items()}
    cases.update({a: update_call(accelerator, policy, a, trajectories[sizes[a]]) for a in algorithms})
    times = medians(cases, repeats, policy.device)
    horizon = policy.num_actions
    rows = []
    for algorithm in algorithms:
        floor = horizon * times[f"pass{sizes[algorithm]}"]
        target = "<= 1.05" if algorithm == "rebel" else ""
        rows.append((name, f"{algorithm} update / floor (T={horizon} denoiser forward+backward on {sizes[algorithm]} samples)",
                     times[algorithm] / floor, f"{ms(times[algorithm])} / {ms(floor)}", target))
    return rows


# ---- (b') the flow-matching policy: its sampler against StableDiffusion3Pipeline, its update against the floor ----


def flow_policy(pipeline: StableDiffusion3Pipeline, sde: str, num_steps: int = 8) -> FlowMatchPolicy:
    """A flow policy with a non-zero LoRA on its own copy of `pipeline`'s transformer and scheduler (sharing the VAE
    and text encoders), at the shipped tiny model's settings: 32 px, guidance 1, 16 rows of T5 zeros."""
    own = StableDiffusion3Pipeline(**{**pipeline.components, "transformer": copy.deepcopy(pipeline.transformer),
                                      "scheduler": copy.deepcopy(pipeline.scheduler)})
    own.set_progress_bar_config(disable=True)
    policy = FlowMatchPolicy(own, num_steps=num_steps, guidance_scale=1.0, resolution=32, sde=sde,
                             sde_window=(0, 4) if sde != "ode" else (), max_sequence_length=16,
                             device=pipeline.device)
    perturb_lora(policy)
    return policy


def transformer_forward_backward(policy: FlowMatchPolicy, trajectory: Trajectory) -> Callable[[], None]:
    """One forward and backward of the transformer (guided, LoRA unmerged, as in training) on the trajectory's first
    stochastic state."""
    state = trajectory.states[:, 0]

    def run() -> None:
        policy.guided_prediction(state, policy.window_start, trajectory.conditioning).mean().backward()
        clear_gradients(policy)

    return run


def flow_rows(batch: int, repeats: int, accelerator: Accelerator, device: torch.device) -> list[Row]:
    """`FlowMatchPolicy.sample` with the ODE (the pipeline's own images) against `StableDiffusion3Pipeline.__call__` on
    the shipped tiny flow model, bare and with the same LoRA; and REBEL's update on a 4-step `flow_sde` window against
    its floor."""
    bare = StableDiffusion3Pipeline.from_pretrained(
        TINY_FLOW, **absent_components(TINY_FLOW, "StableDiffusion3Pipeline")).to(device)
    bare.set_progress_bar_config(disable=True)
    policy = flow_policy(bare, "ode")
    prompts = [PROMPT] * batch

    def pipeline_call(pipeline: StableDiffusion3Pipeline) -> Callable[[], object]:
        return lambda: pipeline(prompts, num_inference_steps=policy.num_steps, guidance_scale=policy.guidance_scale,
                                generator=torch.Generator().manual_seed(0), output_type="pt", height=32, width=32,
                                max_sequence_length=16)

    times = medians({
        "sampler": lambda: policy.sample(prompts, generator=torch.Generator().manual_seed(0)),
        "bare": pipeline_call(bare),
        "lora": pipeline_call(policy.pipeline),
    }, repeats, device)
    name, where = "tiny flow", f"batch {batch}, {policy.num_steps} ODE steps, 32 px"
    rows = [
        (name, f"`FlowMatchPolicy.sample` / bare `StableDiffusion3Pipeline` ({where})", times["sampler"] / times["bare"],
         f"{ms(times['sampler'])} / {ms(times['bare'])}", "<= 1.0"),
        (name, f"`FlowMatchPolicy.sample` / the pipeline with the same LoRA loaded ({where})",
         times["sampler"] / times["lora"], f"{ms(times['sampler'])} / {ms(times['lora'])}", "<= 1.0"),
    ]
    return rows + update_rows(name, flow_policy(bare, "flow_sde"), accelerator, ["rebel"], repeats,
                              transformer_forward_backward)


# ---- (c) update memory against the horizon ----


class SavedTensorMeter:
    """The peak bytes autograd holds for backward while `with meter:` is active: distinct storages of the tensors saved
    by the graph, the model's weights excluded (they are held anyway, saved or not).

    A resident-set or allocator count on CPU also sees glibc's caching and the memory of earlier calls; the saved
    tensors are exactly what a longer graph would grow. The trainer holds one UNet graph at a time, so their peak is
    what the horizon must not change. Storages are counted once however many saved tensors view them, and leave the
    count when autograd frees the last of them (the `_Saved` holder dies with its graph).
    """

    def __init__(self, weights: list[torch.Tensor]) -> None:
        self.weights = {w.untyped_storage().data_ptr() for w in weights}
        self.live: dict[int, int] = {}  # storage address -> saved tensors alive on it
        self.bytes = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _Saved.unpack)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address in self.weights:
            return tensor
        if address not in self.live:
            self.live[address] = 0
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        self.live[address] += 1
        return _Saved(self, tensor, address, storage.nbytes())

    def release(self, address: int, size: int) -> None:
        self.live[address] -= 1
        if not self.live[address]:
            del self.live[address]
            self.bytes -= size

    def __enter__(self) -> SavedTensorMeter:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__(*exc)


class _Saved:
    """One saved tensor as the meter packs it; its deletion (the graph freed) releases the tensor's storage."""

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, address: int, size: int) -> None:
        self.meter, self.tensor, self.address, self.size = meter, tensor, address, size

    @staticmethod
    def unpack(packed: torch.Tensor | _Saved) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __del__(self) -> None:
        self.meter.release(self.address, self.size)


def update_peak_mb(run: Callable[[], None], policy: LCMPolicy) -> float:
    """What `run` holds at its peak beyond the memory before it, in MiB: on CUDA the allocator's high-water mark
    (`torch.cuda.max_memory_allocated`), on CPU the live bytes saved for backward (`SavedTensorMeter`)."""
    gc.collect()
    device = policy.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return peak_memory_mb(device) - before
    with SavedTensorMeter(list(policy.pipeline.unet.parameters())) as meter:
        run()
    return meter.peak / 2**20


def memory_rows(name: str, policies: dict[int, LCMPolicy], accelerator: Accelerator) -> list[Row]:
    """The REBEL update's peak memory on one pair, at the longest horizon T of `policies` against the shortest.

    Memory is not a timing: one measured call each. On CUDA it follows an unmeasured call, which pays the one-time
    allocations (cuBLAS workspace, the allocator's first blocks); the CPU count of saved tensors has none.
    """
    runs = {}
    for horizon, policy in policies.items():
        pair = policy.sample([PROMPT] * 2, generator=torch.Generator().manual_seed(0))
        runs[horizon] = update_call(accelerator, policy, "rebel", pair)
    peaks = {}
    for horizon, run in runs.items():
        if policies[horizon].device.type == "cuda":
            run()
        peaks[horizon] = update_peak_mb(run, policies[horizon])
    long, short = max(runs), min(runs)
    long_mb, short_mb = peaks[long], peaks[short]
    device = policies[long].device
    counter = ("growth of CUDA `max_memory_allocated`" if device.type == "cuda"
               else "live bytes saved for backward, weights excluded")
    return [(name, f"rebel update peak memory, horizon T={long} / T={short} ({counter})", long_mb / short_mb,
             f"{long_mb:.2f} MiB / {short_mb:.2f} MiB", "<= 1.2")]


# ---- (d) an epoch against its floor ----


def epoch_config(logdir: Path, run_name: str, quick: bool) -> ConfigDict:
    """One REBEL epoch on the tiny model: 2 sampling batches of 4 pairs, one pair per micro-batch, 2 micro-batches per
    optimizer step (quick: 1 batch of 1 pair, one step)."""
    config = get_config()
    config.model.pretrained = str(TINY_LCM)
    config.prompt_file = str(REPO / "assets" / "prompts.txt")
    config.resolution = 32
    config.logdir, config.run_name, config.log_with = str(logdir), run_name, ""
    config.num_epochs = 1
    config.sample.batch_size, config.sample.num_batches_per_epoch = (1, 1) if quick else (4, 2)
    config.train.batch_size, config.train.gradient_accumulation_steps = 1, (1 if quick else 2)
    config.stat_tracker.min_count = 2
    config.grid.num_prompts = 0
    return config


def epoch_rows(policy: LCMPolicy, repeats: int, quick: bool) -> list[Row]:
    """A 1-epoch REBEL run of `trainer.train` on the tiny model; its `seconds` against the sum of its parts, measured
    on `policy`, the tiny model at the config's resolution, steps and LoRA rank (LoRA values do not change costs)."""
    config = epoch_config(Path(), "", quick)
    if (policy.resolution, policy.num_steps) != (config.resolution, config.model.num_steps):
        raise ValueError("the epoch's floor must be measured at the trained resolution and number of steps")
    k = ALGORITHMS["rebel"].group_size(config)
    sampling_batch = config.sample.batch_size * k
    device = policy.device
    horizon, num_steps = policy.num_actions, policy.num_steps
    reward_fn = make_reward_fn(config.reward.name, device=device, dtype=torch.float32)
    samples = policy.sample([PROMPT] * sampling_batch, generator=torch.Generator().manual_seed(0))
    pair = samples[[0, 1]]

    def forward(batch: int, merged: bool) -> Callable[[], None]:
        """One no-grad UNet call on `batch` samples, with the LoRA merged as sampling runs it or unmerged as the KL."""
        w = policy.w_embedding.expand(batch, -1)
        state, conditioning = samples.states[:batch, 0], samples.conditioning[:batch]

        @torch.no_grad()
        def run() -> None:
            with merged_lora(policy.lora_sites) if merged else contextlib.nullcontext():
                policy.model(state, policy.timesteps[0], timestep_cond=w, encoder_hidden_states=conditioning)

        return run

    with tempfile.TemporaryDirectory() as logdir:  # the runs' checkpoints are not kept
        runs: list[Path] = []

        def epoch() -> None:
            # `train` prints its run folder: stdout is kept for the table.
            with contextlib.redirect_stdout(sys.stderr):
                runs.append(train(epoch_config(Path(logdir), f"run{len(runs)}", quick)))

        times = medians({
            "epoch": epoch,
            "forward_sampling": forward(sampling_batch, merged=policy.merge_for_sampling),
            "forward_kl": forward(config.kl_log_samples, merged=False),
            "pass": unet_forward_backward(policy, pair),
            "decode": lambda: policy.decode(samples.states[:, -1]),
            "reward": lambda: reward_fn(samples.outputs, samples.prompts),
        }, repeats, device)
        # The warm-up run is left out, as for every other case; `seconds` is the epoch loop only, without model loading.
        seconds = Timing([json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["seconds"]
                          for run in runs[1:]])
    batches = config.sample.num_batches_per_epoch
    micro_batches = batches * config.sample.batch_size // config.train.batch_size
    # Sampling: num_steps UNet calls per batch; the logged KL: the adapted and the base UNet at each of the T steps of
    # `kl_log_samples` trajectories; training: T forward+backward passes per pair.
    floor = (batches * (num_steps * times["forward_sampling"] + times["decode"] + times["reward"])
             + 2 * horizon * times["forward_kl"] + micro_batches * horizon * times["pass"])
    return [("tiny LCM", f"rebel epoch (`trainer.train`, {batches} x {sampling_batch} samples, {micro_batches} pairs) / "
             "floor (its UNet passes x their cost + decode + reward)", seconds / floor,
             f"{ms(seconds)} / {ms(floor)}", "")]


SERVER_LATENCY_S = 0.25  # a remote reward (a scoring server) or a GPU reward model that leaves the CPU free meanwhile


@register_reward("bench_reward_server", kind="any")
def _reward_server(device=None, dtype=None) -> Callable:
    """JPEG compressibility, answered after a fixed latency, as a reward behind a network call would be."""
    jpeg = make_reward_fn("jpeg_compressibility")

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        time.sleep(SERVER_LATENCY_S)
        return jpeg(images, prompts)

    return reward_fn


def overlap_rows(repeats: int, quick: bool) -> list[Row]:
    """A 1-epoch REBEL run with a reward of fixed latency, scored beside sampling (`sample.overlap_reward`) against
    in sequence; with n sampling batches the overlap can hide at most n - 1 of the n reward calls."""
    with tempfile.TemporaryDirectory() as logdir:
        runs: dict[bool, list[Path]] = {True: [], False: []}

        def epoch(overlap: bool) -> Callable[[], None]:
            def run() -> None:
                config = epoch_config(Path(logdir), f"overlap{overlap}_{len(runs[overlap])}", quick)
                config.reward.name = "bench_reward_server"
                config.sample.num_batches_per_epoch = 2 if quick else 4
                config.sample.overlap_reward = overlap
                with contextlib.redirect_stdout(sys.stderr):
                    runs[overlap].append(train(config))

            return run

        medians({"overlap": epoch(True), "sequence": epoch(False)}, repeats, torch.device("cpu"))
        seconds = {overlap: Timing([json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["seconds"]
                                    for run in found[1:]])
                   for overlap, found in runs.items()}
    batches = 2 if quick else 4
    return [("tiny LCM", f"rebel epoch, reward scored beside sampling / in sequence ({batches} batches, reward latency "
             f"{SERVER_LATENCY_S * 1e3:.0f} ms)", seconds[True] / seconds[False],
             f"{ms(seconds[True])} / {ms(seconds[False])}", "< 1")]


def remote_rows(repeats: int, quick: bool) -> list[Row]:
    """A 1-epoch REBEL run with `shape_fidelity` served by `python -m rebel_diffusion.serve_reward` in another process
    (`reward.name` its URL) against the same reward in the trainer's process, with `sample.overlap_reward` on and off:
    each case's `seconds` over the in-process run with overlap on, the default setting."""
    batches = 2 if quick else 4
    with tempfile.TemporaryDirectory() as logdir, serve_in_subprocess(
            ["--reward", "shape_fidelity", "--device", "cpu"], Path(logdir) / "server.log",
            env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}) as url:
        runs: dict[tuple[str, bool], list[Path]] = {(where, overlap): [] for where in ("local", "served")
                                                   for overlap in (True, False)}

        def epoch(where: str, overlap: bool) -> Callable[[], None]:
            def run() -> None:
                config = epoch_config(Path(logdir), f"{where}{overlap}_{len(runs[where, overlap])}", quick)
                config.prompt_file = str(REPO / "assets" / "quickstart_prompts.txt")  # shapes captions, as it reads
                config.reward.name = url if where == "served" else "shape_fidelity"
                config.sample.num_batches_per_epoch = batches
                config.sample.overlap_reward = overlap
                with contextlib.redirect_stdout(sys.stderr):
                    runs[where, overlap].append(train(config))

            return run

        # --quick judges nothing (one round): its runs skip the warm-up, each a whole trainer run of its own.
        medians({f"{where} {overlap}": epoch(where, overlap) for where, overlap in runs}, repeats, torch.device("cpu"),
                warm_up=not quick)
        seconds = {case: Timing([json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["seconds"]
                                 for run in found[0 if quick else 1:]])
                   for case, found in runs.items()}
    reference = seconds["local", True]
    named = {("served", True): "served, overlap on", ("served", False): "served, overlap off",
             ("local", False): "in-process, overlap off"}
    return [("tiny LCM", f"rebel epoch, shape_fidelity {what} / in-process, overlap on ({batches} batches; the server "
             "a `serve_reward` subprocess on the same CPU)", seconds[case] / reference,
             f"{ms(seconds[case])} / {ms(reference)}", "") for case, what in named.items()]


# ---- (e) the text sampler ----


def text_rows(batch: int, repeats: int, device: torch.device) -> list[Row]:
    """`CausalLMPolicy.sample` (generate with `output_logits`, log-probs from those logits, no extra forward) against
    the bare `model.generate` on ready token ids, and against the same job done with the library (tokenize the prompts,
    `model.generate`, decode the responses). Each ratio is the median of per-round ratios, with their min-max."""
    policy = CausalLMPolicy.from_pretrained(TINY_LM, device=device, max_new_tokens=4, chat_template=False)
    prompts = (REPO / "assets" / "addition_train_prompts.txt").read_text().split()[:batch]
    input_ids, attention_mask = policy.tokenize_prompts(prompts)

    def generate(ids: torch.Tensor = input_ids, mask: torch.Tensor = attention_mask) -> torch.Tensor:
        return policy.network.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=policy.max_new_tokens,
            temperature=policy.temperature, top_k=policy.top_k, top_p=policy.top_p,
            pad_token_id=policy.tokenizer.pad_token_id, eos_token_id=policy.eos_token_ids,
        )

    def text_to_text() -> list[str]:
        encoded = policy.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt").to(device)
        sequences = generate(encoded["input_ids"], encoded["attention_mask"])
        return policy.tokenizer.batch_decode(sequences[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    times = medians({"sampler": lambda: policy.sample(prompts, generator=torch.Generator().manual_seed(0)),
                     "generate": generate, "text": text_to_text}, repeats, device)
    return [("tiny LM", f"`CausalLMPolicy.sample` / {what} (batch {len(prompts)}, {policy.max_new_tokens} tokens; "
             "log-probs from generate's logits)", times["sampler"] / times[baseline],
             f"{ms(times['sampler'])} / {ms(times[baseline])}", "<= 1.05")
            for baseline, what in [("generate", "`model.generate` on token ids"),
                                   ("text", "tokenize + `model.generate` + decode")]]


# ---- main ----


HEADER = ("| model | measurement | ratio | spread | medians | target | verdict |\n"
          "|---|---|---|---|---|---|---|")


def format_row(model: str, what: str, ratio: float, detail: str, target: str) -> str:
    """One table line: the ratio's median, its spread over rounds, and whether the whole spread meets the target."""
    low, high = spread(ratio)
    if not isinstance(ratio, Ratio):
        extent = "one measurement"
    elif len(ratio.rounds) == 1:
        extent = "one round"
    else:
        extent = f"{low:.3f} to {high:.3f} ({len(ratio.rounds)} rounds)"
    return f"| {model} | {what} | {ratio:.3f} | {extent} | {detail} | {target} | {verdict(ratio, target)} |"


class Table:
    """The markdown table, each row printed (and appended to `out`) as soon as it is measured: a late failure, hours
    into a GPU run, keeps every row before it."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self.lines = [HEADER]
        if out is not None:
            out.write_text(HEADER + "\n")
        print(HEADER, flush=True)

    def add(self, rows: list[Row]) -> None:
        for model, what, ratio, detail, target in rows:
            line = format_row(model, what, ratio, detail, target)
            self.lines.append(line)
            print(line, flush=True)
            if self.out is not None:
                with self.out.open("a") as file:
                    file.write(line + "\n")

    def markdown(self) -> str:
        return "\n".join(self.lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case (median and spread)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny models only, one round, batch 2, a smaller epoch")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--full-size", action="store_true",
                        help="SD-1.5-shaped model at 768 px, bf16, sampling batch 16, 8 steps (GPU; unverified)")
    parser.add_argument("--sd-repeats", type=int, default=3,
                        help="rounds for the SD-1.5-shaped UNet at reduced size (one fp32 forward ~2 s on a CPU core)")
    parser.add_argument("--sd-resolution", type=int, default=64,
                        help="pixels for the SD-1.5-shaped UNet at reduced size (64: 8x8 latents, the smallest it takes)")
    parser.add_argument("--sd-steps", type=int, default=4, help="LCM steps for the SD-1.5-shaped UNet at reduced size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine may be shared)")
    parser.add_argument("--out", type=Path, help="also write the table to this file, row by row")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    accelerator = Accelerator(cpu=device.type == "cpu")
    table = Table(args.out)

    pipeline = tiny_pipeline(device)
    policy = lora_policy(pipeline, 8, 32)
    table.add(sampler_rows("tiny LCM", policy, pipeline, batch=2 if args.quick else 16, repeats=repeats))
    table.add(update_rows("tiny LCM", policy, accelerator, list(ALGORITHMS), repeats))
    table.add(epoch_rows(policy, repeats, args.quick))
    table.add(overlap_rows(repeats, args.quick))
    table.add(remote_rows(repeats, args.quick))
    table.add(text_rows(2 if args.quick else 32, repeats, device))
    table.add(flow_rows(2 if args.quick else 16, repeats, accelerator, device))
    # Horizon T = num_steps - 1 stochastic steps: T=8 against T=2.
    table.add(memory_rows("tiny LCM", {8: lora_policy(pipeline, 9, 32), 2: lora_policy(pipeline, 3, 32)}, accelerator))
    del pipeline, policy
    if args.quick:
        return table.markdown()

    gc.collect()
    resolution, batch, steps, sd_repeats, dtype = (
        (768, 16, 8, args.repeats, torch.bfloat16) if args.full_size
        else (args.sd_resolution, 2, args.sd_steps, args.sd_repeats, torch.float32))
    name = f"SD-1.5-shaped UNet, {resolution} px"
    pipeline = sd15_pipeline(resolution, args.full_size, device, dtype)
    policy = lora_policy(pipeline, steps, resolution)
    table.add(sampler_rows(name, policy, pipeline, batch=batch, repeats=sd_repeats))
    table.add(update_rows(name, policy, accelerator, ["rebel"], sd_repeats))
    del policy
    gc.collect()
    table.add(memory_rows(name, {8: lora_policy(pipeline, 9, resolution), 2: lora_policy(pipeline, 3, resolution)},
                          accelerator))
    return table.markdown()


if __name__ == "__main__":
    main()
