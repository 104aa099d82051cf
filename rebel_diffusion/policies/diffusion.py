"""What the diffusers-based image policies share: loading a pipeline folder, the clean-latent prediction, a window of
stochastic steps, prompt encoding with classifier-free guidance, the sampled chain, its re-scoring against the base
model, VAE decoding and output writing, and LoRA weights in diffusers' format.

`WindowedDiffusionPolicy` is the chain of `FlowMatchPolicy` (SD3) and `DDIMPolicy` (SD 1.5, SDXL): N scheduler steps,
of which those in the window (first step, count) are Gaussian actions with log-probs and the others are the scheduler's
deterministic step. A subclass supplies the text encoding, the network call and the two kinds of step.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from ml_collections import ConfigDict
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import Linear as LoraLinear
from tqdm.auto import tqdm

from rebel_diffusion.grids import save_image_grid
from rebel_diffusion.policies import same_prompt_pairs
from rebel_diffusion.trajectory import Trajectory


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample `(B,)`: the mean over latent dims (DDPO/RLCM's scale) or the exact sum."""
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.flatten(1)
    return log_prob.mean(dim=1) if reduction == "mean" else log_prob.sum(dim=1)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) per sample `(B,)`: `(mean - mean_ref)^2 / (2 std^2)` reduced over
    the latent dims like `gaussian_log_prob` ("mean" or "sum"), so that it sits on the log-probs' scale."""
    kl = ((mean - mean_ref) ** 2 / (2 * std**2)).flatten(1)
    return kl.mean(dim=1) if reduction == "mean" else kl.sum(dim=1)


@contextlib.contextmanager
def _adapters_disabled(unet: torch.nn.Module, disabled: bool) -> Iterator[None]:
    """Run the base UNet (LoRA off) inside the block when `disabled`; the adapter is back on afterwards, even on error."""
    if not disabled:
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


LoraSite = tuple[torch.nn.Module, str, LoraLayer]  # (parent module, attribute name, the LoRA layer there)


def lora_sites(unet: torch.nn.Module) -> list[LoraSite]:
    """Every peft LoRA layer of `unet` with the parent and attribute name it hangs from."""
    modules = dict(unet.named_modules())
    sites = []
    for name, module in modules.items():
        if isinstance(module, LoraLayer):
            parent, _, attribute = name.rpartition(".")
            sites.append((modules[parent], attribute, module))
    return sites


def freeze_and_add_lora(network: torch.nn.Module, frozen: list[torch.nn.Module], device: torch.device,
                        dtype: torch.dtype, lora_config: LoraConfig, gradient_checkpointing: bool) -> list[LoraSite]:
    """Freeze `network` and the `frozen` modules in `dtype` on `device`, add a fp32 LoRA adapter to `network` and return
    its sites. diffusers checkpoints a block only when grad is enabled, so sampling (no_grad) runs as before."""
    for module in [network, *frozen]:
        module.requires_grad_(False)
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    network.add_adapter(lora_config)
    cast_training_params(network, dtype=torch.float32)
    if gradient_checkpointing:
        network.enable_gradient_checkpointing()
    return lora_sites(network)


class _MergedWeight:
    """A LoRA layer's merged weight `W + sum of deltas`, kept between sampling calls with what it was computed from.

    `weight` is allocated once and rewritten in place: a new 357 MiB of merged copies at every `sample` call (SD-1.5's
    128 attention projections, fp32) cost the CPU one page fault per 4 KiB on first touch, more than the merge's
    arithmetic. `source` identifies W (its storage, version counter, shape, dtype and device) and the adapters'
    names and scalings; `lora` holds copies of the adapters' A and B, compared by value: an in-place change through
    `.data` bypasses the version counters, and the LoRA weights are small (0.3% of SD-1.5's UNet at rank 8).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = torch.empty_like(weight)
        self.source: tuple | None = None  # None while `weight` holds nothing valid (not merged yet, or a merge failed)
        self.lora: list[torch.Tensor] = []


def _lora_weights(layer: LoraLayer, adapters: list[str]) -> list[torch.Tensor]:
    """The A and B weights of `layer`'s `adapters`, in order: what a merged weight depends on besides W."""
    return [w for name in adapters for w in (layer.lora_A[name].weight, layer.lora_B[name].weight)]


def _merged_weight(layer: LoraLayer, adapters: list[str]) -> torch.Tensor:
    """`W + sum(delta)` for `layer`'s active `adapters` (at least one), recomputed only when W, the adapters or their
    values changed."""
    weight = layer.get_base_layer().weight
    merged = getattr(layer, "_rebel_merged", None)
    if merged is None or merged.weight.shape != weight.shape or merged.weight.dtype != weight.dtype \
            or merged.weight.device != weight.device:
        merged = _MergedWeight(weight)
        layer._rebel_merged = merged
    source = (weight.data_ptr(), weight._version, tuple((name, layer.scaling[name]) for name in adapters))
    lora = _lora_weights(layer, adapters)
    if merged.source == source and all(torch.equal(a, b) for a, b in zip(merged.lora, lora, strict=True)):
        return merged.weight
    merged.source = None  # an exception below leaves a half-written buffer: never reuse it
    if isinstance(layer, LoraLinear) and not layer.fan_in_fan_out:
        # The delta's matmul writes straight into the buffer (addmm: W + scaling * B @ A), no temporary per site.
        first, *others = adapters
        torch.addmm(weight, layer.lora_B[first].weight, layer.lora_A[first].weight, alpha=layer.scaling[first],
                    out=merged.weight)
        for name in others:
            merged.weight.addmm_(layer.lora_B[name].weight, layer.lora_A[name].weight, alpha=layer.scaling[name])
    else:  # convolutions and other layer kinds: peft's own delta, added into the buffer
        torch.add(weight, sum(layer.get_delta_weight(name) for name in adapters), out=merged.weight)
    merged.lora = [w.detach().clone() for w in lora]
    merged.source = source
    return merged.weight


@contextlib.contextmanager
def merged_lora(sites: list[LoraSite]) -> Iterator[None]:
    """Inside the block each LoRA layer is replaced by its base layer with weight `W + scaling * B @ A`.

    An unmerged adapter costs two extra matmuls per projection at every UNet call, and even peft's merged layer a
    Python wrapper call; with the bare base layers in place the UNet runs as the plain pipeline's does. peft's
    `merge_adapter()` / `unmerge_adapter()` add and subtract the delta in place, so that every cycle leaves a rounding
    residue in W that accumulates over a run; here the merged weight is a separate tensor swapped in, always computed
    afresh from W, and on exit, even on an exception, the LoRA layers and the original weight tensors are put back: W
    is restored bit for bit.

    The merged weights are kept on each LoRA layer between blocks and recomputed only when W or the adapter changed
    (an optimizer step, `load_lora`, the adapter disabled or switched): sampling batches between two optimizer steps
    merge once. The cost is memory: one extra copy of every adapted weight for the layer's lifetime (357 MiB for
    SD-1.5's 128 attention projections in fp32, 11% of its UNet), where it used to exist only inside the block.

    The reference (adapter disabled) cannot run inside the block. Gradients would not reach the LoRA weights through
    the merged copy, so the block refuses grad mode: it is for sampling only.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("merged_lora is for no-grad sampling: gradients do not reach LoRA weights merged into W")
    swapped = []
    try:
        for parent, attribute, layer in sites:
            base = layer.get_base_layer()
            # A disabled adapter (the base model, e.g. `sample --compare-base`) contributes nothing to the merge.
            adapters = [] if layer.disable_adapters else [name for name in layer.active_adapters if name in layer.lora_A]
            swapped.append((parent, attribute, layer, base.weight.data))
            if adapters:  # disabled: the base layer runs on W itself
                base.weight.data = _merged_weight(layer, adapters)
            setattr(parent, attribute, base)
        yield
    finally:
        for parent, attribute, layer, data in swapped:
            layer.get_base_layer().weight.data = data
            setattr(parent, attribute, layer)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_model_path(path: str) -> None:
    """`FileNotFoundError` (one line) for a model path that is neither an existing folder nor a Hub id."""
    if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"model {path!r} is neither an existing folder nor a Hugging Face Hub id (owner/name)")


def load_pipeline(pipeline_class: type, path: str, dtype: torch.dtype, **components):
    """`pipeline_class.from_pretrained` on a local folder or a Hub id, with its progress bar off.

    Raises `FileNotFoundError` (one line) for a path that is neither, or a folder diffusers cannot load.
    """
    check_model_path(path)
    local = Path(path).expanduser()
    try:
        pipeline = pipeline_class.from_pretrained(str(local) if local.exists() else path, dtype=dtype, **components)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load model {path!r}: {first_line(e)}") from e
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def check_options(logprob_reduction: str, decode_batch_size: int) -> None:
    """`ValueError` for the options every diffusion policy takes: the log-prob reduction and the VAE's slice size."""
    if logprob_reduction not in ("mean", "sum"):
        raise ValueError(f"logprob_reduction must be 'mean' or 'sum', got {logprob_reduction!r}")
    if decode_batch_size < 1:
        raise ValueError(f"decode_batch_size must be at least 1, got {decode_batch_size}")


def config_options(config: ConfigDict, lora_targets: tuple[str, ...]) -> dict:
    """The `from_pretrained` options every diffusion policy reads from a training config: `model.num_steps`,
    `model.guidance_scale`, `resolution`, `model.logprob_reduction`, `lora.*` (`lora.targets` "" = `lora_targets`),
    `sample.decode_batch_size` and `train.gradient_checkpointing`."""
    targets = tuple(t.strip() for t in config.lora.targets.split(",") if t.strip()) or lora_targets
    return dict(
        num_steps=config.model.num_steps, guidance_scale=config.model.guidance_scale, resolution=config.resolution,
        logprob_reduction=config.model.logprob_reduction, lora_rank=config.lora.rank, lora_alpha=config.lora.alpha,
        lora_init=config.lora.init, lora_targets=targets, decode_batch_size=config.sample.get("decode_batch_size", 4),
        gradient_checkpointing=config.train.get("gradient_checkpointing", False),
    )


def hub_pipeline_class(path: str, pipelines: dict[str, type]) -> str:
    """The pipeline class a Hub id (or a folder without `model_index.json`) names in its `model_index.json`, one of
    `pipelines`' keys; `FileNotFoundError` (one line) when it cannot be read, `ValueError` for another class."""
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(path)["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"cannot load model {path!r}: {first_line(e)}") from e
    if name not in pipelines:
        raise ValueError(f"model.pretrained {path!r} is a {name}, not a {' or '.join(pipelines)}")
    return name


def model_index(path: str | Path) -> dict:
    """A local pipeline folder's `model_index.json`; {} for a Hub id or a folder without a readable one."""
    index = Path(path).expanduser() / "model_index.json"
    try:
        return json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        return {}


def predicted_original_sample(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent x_0 and the noise eps that `x_t = sqrt(alpha_prod_t) x_0 + sqrt(1 - alpha_prod_t) eps` implies.

    Args:
        model_output: `(B, C, h, w)` the UNet's prediction at t: eps ("epsilon"), x_0 ("sample") or v ("v_prediction").
        sample: `(B, C, h, w)` the latent x_t; alpha_prod_t: the cumulative alpha at t (0-dim).

    Returns:
        `pred_original_sample` and `pred_epsilon`, both `(B, C, h, w)`.
    """
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt(), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t.sqrt() * model_output) / beta_prod_t.sqrt()
    if prediction_type == "v_prediction":
        return (alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output,
                alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def parse_window(sde_window, available: int, steps: str) -> tuple[int, int]:
    """`sample.sde_window` as (first stochastic step, count) within the `available` stochastic steps; `()` = all of
    them. `steps` says whose steps they are, for the message. Raises `ValueError` naming the key."""
    window = tuple(sde_window) if sde_window is not None else ()
    if not window:
        return 0, available
    if len(window) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in window):
        raise ValueError(f"sample.sde_window must be () or (first step, count) of integers, got {sde_window!r}")
    first, count = window
    if first < 0 or count < 1 or first + count > available:
        raise ValueError(f"sample.sde_window {window} is outside the {available} stochastic steps of {steps}: "
                         f"need 0 <= first, 1 <= count, first + count <= {available}")
    return first, count


def save_unet_lora(pipeline_class: type, unet: torch.nn.Module, directory: str | Path) -> None:
    """Write the UNet's LoRA as `pytorch_lora_weights.safetensors` in diffusers' naming, what
    `pipeline_class.load_lora_weights(directory)` reads. The adapter's config goes in the file's metadata: without it
    diffusers loads the weights with alpha = rank, and any other `lora.alpha` would scale the update wrongly."""
    pipeline_class.save_lora_weights(
        directory, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def load_unet_lora(pipeline_class: type, unet: torch.nn.Module, directory: str | Path) -> None:
    """Load LoRA weights written by `save_unet_lora` into the UNet's adapter; `ValueError` when they do not fit."""
    state, _ = pipeline_class.lora_state_dict(str(directory))
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state))
    if result is not None and getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA weights in {directory} do not fit this UNet: {result.unexpected_keys[:3]}")
    cast_training_params(unet, dtype=torch.float32)


class ImageOutputs:
    """Decoding and writing images, for a policy with `vae`, `pipeline.image_processor`, `decode_batch_size` and
    `sample`."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [0, 1], float32, from final latents `(B, C, h, w)`, `decode_batch_size` at a time,
        unscaled as the pipelines do: `latents / scaling_factor + shift_factor` (SD3's shift; none for SD and SDXL).

        Each image is decoded on its own by the VAE (no layer mixes samples), so the slices equal one big decode.
        """
        config, images = self.vae.config, []
        for part in latents.split(self.decode_batch_size):
            part = part.to(self.vae.dtype) / config.scaling_factor + (config.get("shift_factor") or 0.0)
            image = self.vae.decode(part, return_dict=False)[0]
            images.append(self.pipeline.image_processor.postprocess(image, output_type="pt").float())
        return torch.cat(images)

    @torch.no_grad()
    def save_samples(self, prompts: list[str], seeds: list[int], path: Path | None) -> None:
        """A PNG grid at `path`.png: rows = prompts, columns = seeds (each column one `torch.Generator` seed).

        With `path` None it samples without writing: every process runs the same calls, one of them saves.
        """
        columns = [self.sample(prompts, generator=torch.Generator().manual_seed(seed)).outputs for seed in seeds]
        if path is not None:
            self.write_outputs(prompts, columns, path)

    def write_outputs(self, prompts: list[str], outputs_by_seed: list[torch.Tensor], path: Path) -> None:
        """A PNG grid at `path`.png: rows = prompts, columns = seeds."""
        save_image_grid(torch.stack(outputs_by_seed, dim=1), prompts, Path(path).with_suffix(".png"))

    @torch.no_grad()
    def diversity(self, outputs: torch.Tensor, prompts: list[str]) -> float:
        """Mean over pairs of same-prompt images of their RMS pixel difference, `sqrt(mean((a - b)^2))` over the
        `(3, H, W)` values in [0, 1]: 0 for identical images, 1 for black against white; NaN without such a pair."""
        first, second = same_prompt_pairs(prompts)
        if not first:
            return float("nan")
        images = outputs.float()
        return (images[first] - images[second]).square().flatten(1).mean(dim=1).sqrt().mean().item()


class WindowedDiffusionPolicy(ImageOutputs):
    """A LoRA-adapted denoiser sampled for N scheduler steps, those of the window being Gaussian actions.

    A subclass's `__init__` sets `pipeline`, `denoiser` (the adapted network), `model` (the same, or the trainer's
    wrapper of it), `vae`, `num_steps`, `window_start`, `window_size`, `guidance_scale`, `logprob_reduction`,
    `decode_batch_size`, `lora_sites`, `merge_for_sampling`, `device` and `dtype`, and implements `_encode_prompt`,
    `_negative_prompt`, `_call_denoiser`, `_gaussian` and `_deterministic_step`.
    """

    kind = "image"
    has_reference = True  # the denoiser with its LoRA adapter disabled

    def _adapt(self, denoiser: torch.nn.Module, encoders: list[torch.nn.Module | None], lora_config: LoraConfig,
               gradient_checkpointing: bool) -> None:
        """Freeze the VAE, the text encoders (None where the pipeline has none) and `denoiser`, add the fp32 LoRA
        adapter to `denoiser`, and set `denoiser`, `model`, `lora_sites` and `merge_for_sampling`; needs `vae`,
        `device` and `dtype` set."""
        self.denoiser = denoiser
        self.lora_sites = freeze_and_add_lora(denoiser, [self.vae, *(e for e in encoders if e is not None)], self.device,
                                              self.dtype, lora_config, gradient_checkpointing)
        # As in LCMPolicy: a fp32 LoRA merged into half-precision weights would round W + delta.
        self.merge_for_sampling = self.dtype == torch.float32
        self.model = denoiser  # the trainer may swap in a wrapper; every trained call goes through it

    @property
    def num_actions(self) -> int:
        """T: the stochastic steps of the window, each with a log-probability."""
        return self.window_size

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance, as the pipelines do it: on above a scale of 1."""
        return self.guidance_scale > 1

    def check_prompts(self, prompts: list[str]) -> None:
        """Any text is a valid prompt: the tokenizers truncate, as the pipeline does."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights."""
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def step_chunks(self) -> list[range]:
        """One step per graph: a single denoiser graph alive at a time."""
        return [range(step, step + 1) for step in range(self.num_actions)]

    def in_window(self, step: int) -> bool:
        """Whether scheduler step `step` is a stochastic action (inside `sample.sde_window`)."""
        return self.window_start <= step < self.window_start + self.window_size

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's embeddings `(L, D)` and pooled embedding `(P,)` (`(0,)` without one), as the pipeline computes
        them."""
        raise NotImplementedError

    def _negative_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional branch's `(L, D)` and `(P,)`, as the pipeline computes them without a negative prompt."""
        raise NotImplementedError

    def _call_denoiser(self, network: torch.nn.Module, model_input: torch.Tensor, step: int, embeds: torch.Tensor,
                       pooled: torch.Tensor) -> torch.Tensor:
        """`network`'s prediction `(B', C, h, w)` at scheduler step `step` on a batch (with CFG, uncond then cond)."""
        raise NotImplementedError

    def _gaussian(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor,
                  reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean `(B, C, h, w)`, std 0-dim) of the next latent at stochastic step `step` (a scheduler index)."""
        raise NotImplementedError

    def _deterministic_step(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor) -> torch.Tensor:
        """The next latent `(B, C, h, w)` at scheduler step `step` outside the window (the scheduler's noise-free step)."""
        raise NotImplementedError

    @torch.no_grad()
    def _cached(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = self._encode_prompt(prompt)
        return self._prompt_cache[prompt]

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The conditioning `(B, L * D + P)`: each prompt's embeddings `(L, D)` flattened, then its pooled embedding
        `(P,)`; computed once per distinct prompt (each on its own, so it never depends on its batch: a resumed run
        reproduces an uninterrupted one bit for bit) and cached."""
        pairs = [self._cached(p) for p in prompts]
        return torch.stack([torch.cat([embeds.flatten(), pooled]) for embeds, pooled in pairs])

    def _unpack(self, conditioning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings `(B, L, D)`, pooled `(B, P)`) from `encode_prompts`' packing."""
        length, dim = self._cached("")[0].shape
        return conditioning[:, : length * dim].view(len(conditioning), length, dim), conditioning[:, length * dim :]

    def guided_prediction(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor,
                          reference: bool = False) -> torch.Tensor:
        """The guided prediction `(B, C, h, w)` float32 at scheduler step `step`: one denoiser call on the batch of
        unconditional and conditional inputs (the pipelines' order), `u + g (c - u)`. `reference` runs the base
        denoiser (adapter off) without grad."""
        embeds, pooled = self._unpack(conditioning)
        model_input = latents.to(self.dtype)
        if self.do_cfg:
            negative, negative_pooled = self._negative_prompt()
            embeds = torch.cat([negative.expand(len(latents), -1, -1), embeds])
            pooled = torch.cat([negative_pooled.expand(len(latents), -1), pooled])
            model_input = torch.cat([model_input, model_input])
        network = self.denoiser if reference else self.model
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32), \
                _adapters_disabled(self.denoiser, reference), \
                torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            prediction = self._call_denoiser(network, model_input, step, embeds.to(self.dtype), pooled.to(self.dtype))
        if self.do_cfg:
            uncond, text = prediction.chunk(2)
            prediction = uncond + self.guidance_scale * (text - uncond)
        return prediction.float()

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """`(B, C, h, w)` of the latents of `resolution`-pixel images."""
        side = self.resolution // self.pipeline.vae_scale_factor
        return batch, self.denoiser.config.in_channels, side, side

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None, with_kl: bool = False,
               progress: bool = False) -> Trajectory:
        """Sample `prompts` and record the window's stochastic steps.

        The initial latents, then each window step's noise, are drawn in the pipeline's order from `generator`.
        `with_kl` also records `ln pi(a_t|s_t) - ln pi_ref(a_t|s_t)` at the sampled action (k1: its score-function
        gradient is the trajectory KL's, which the exact per-state KL would miss).

        Returns:
            A `Trajectory` with `states`/`actions` `(B, T, C, h, w)` (T = the window's steps), `log_probs` `(B, T)`,
            `outputs` the images `(B, 3, H, W)` in [0, 1], `conditioning` `(B, L * D + P)` and with `with_kl` `kl`.
        """
        conditioning = self.encode_prompts(prompts)
        shape = self.latent_shape(len(prompts))
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        states, actions, stds, log_probs = [], [], [], []
        with merged_lora(self.lora_sites) if self.merge_for_sampling else contextlib.nullcontext():
            for step in tqdm(range(self.num_steps), desc="sampling", leave=False, disable=not progress):
                if not self.in_window(step):
                    latents = self._deterministic_step(latents, step, conditioning)
                    continue
                mean, std = self._gaussian(latents, step, conditioning)
                noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
                next_latents = mean + std * noise
                log_probs.append(gaussian_log_prob(next_latents, mean, std, self.logprob_reduction))
                states.append(latents)
                actions.append(next_latents)
                stds.append(std)
                latents = next_latents
        # The reference needs the unmerged weights with the adapter off: its passes run after the chain.
        kls = [
            log_prob - gaussian_log_prob(action, self._gaussian(state, self.window_start + j, conditioning, True)[0], std,
                                         self.logprob_reduction)
            for j, (state, action, std, log_prob) in enumerate(zip(states, actions, stds, log_probs))
        ] if with_kl else []
        images = self.decode(latents)
        batch = len(prompts)
        empty = torch.zeros((batch, 0, *shape[1:]), device=self.device)
        log_probs = torch.stack(log_probs, dim=1) if log_probs else torch.zeros((batch, 0), device=self.device)
        return Trajectory(
            prompts=list(prompts),
            states=torch.stack(states, dim=1) if states else empty,
            actions=torch.stack(actions, dim=1) if actions else empty,
            log_probs=log_probs,
            mask=torch.ones_like(log_probs, dtype=torch.bool),
            outputs=images,
            conditioning=conditioning,
            kl=(torch.stack(kls, dim=1) if kls else torch.zeros_like(log_probs)) if with_kl else None,
        )

    def log_prob(
        self, trajectory: Trajectory, steps: range, with_kl: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi_theta(a_t | s_t) `(B, len(steps))` for window steps t, with grad; with `with_kl` also the exact
        `gaussian_kl` of the step's two means (policy, base denoiser) under its std `(B, len(steps))`."""
        log_probs, kls = [], []
        for j in steps:
            step, state = self.window_start + j, trajectory.states[:, j]
            mean, std = self._gaussian(state, step, trajectory.conditioning)
            log_probs.append(gaussian_log_prob(trajectory.actions[:, j].float(), mean, std, self.logprob_reduction))
            if with_kl:
                mean_ref, _ = self._gaussian(state, step, trajectory.conditioning, reference=True)
                kls.append(gaussian_kl(mean, mean_ref, std, self.logprob_reduction))
        return torch.stack(log_probs, dim=1), torch.stack(kls, dim=1) if with_kl else None

    @torch.no_grad()
    def kl(self, trajectory: Trajectory) -> torch.Tensor:
        """Per-step KL of the current policy to the base denoiser on the trajectory's states `(B, T)`."""
        return self.log_prob(trajectory, range(self.num_actions), with_kl=True)[1]
