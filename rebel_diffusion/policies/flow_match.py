"""Flow-matching sampling (SD3/SD3.5 `StableDiffusion3Pipeline`, FLUX.1 `FluxPipeline`) as a Markov decision process.

A rectified-flow transformer predicts the velocity `v(x, sigma)` of the straight path `x_sigma = (1 - sigma) x_0 +
sigma x_1` between data (sigma = 0) and noise (sigma = 1); diffusers' `FlowMatchEulerDiscreteScheduler` integrates the
ODE with Euler steps `x_next = x + (sigma_next - sigma) v` on its shifted sigmas. Seen as a policy, the ODE is replaced
by a stochastic process with the same marginals, each step a Gaussian over the next latent (`sample.sde`):

* `"flow_sde"` (Flow-GRPO, Liu et al. 2025): the reverse SDE of the flow, Euler-Maruyama with noise level a;
* `"cps"` (coefficients-preserving sampling, Wang & Yu 2025): re-noise the predicted clean latent with the schedule's
  exact coefficients, injecting `sigma_next sin(a pi / 2)` of fresh noise;
* `"ode"`: diffusers' Euler step; with it the sampler reproduces the pipeline (nothing to train).

Only the steps of the window `sample.sde_window` (first step, count) are stochastic actions with log-probs; the steps
before and after it are ODE steps (Flow-GRPO-Fast, MixGRPO). The policy is a LoRA adapter on the transformer's attention
projections; VAE, text encoders and base weights stay frozen, and the reference is the transformer with the adapter off.

The two families differ only where their pipelines do, each difference a small function or branch here:

* prompts: SD3 concatenates two CLIP contexts with T5's (or zeros) and pools both CLIPs; FLUX takes T5's sequence as
  the context and CLIP's pooled output, with all-zero text position ids;
* latents: FLUX's transformer sees 2x2 patches of the VAE latent packed into tokens (`pack_latents`) with their
  (0, row, column) position ids. The steps are elementwise, so acting on the packed tokens or on the VAE's layout is
  the same arithmetic on the same C h w numbers in another order: the trajectory stays in the VAE's `(B, C, h, w)` (as
  for SD3), so the noise, the log-prob's mean or sum (over all C h w latent elements, for both families) and the
  decode are shared, and the packing happens at the transformer's input and output;
* schedule: FLUX's sigmas are `linspace(1, 1/N, N)` shifted by `mu`, linear in the image's token count
  (`flux_schedule`); the transformer takes `timestep / 1000`;
* guidance: FLUX.1-dev is guidance-distilled: `guidance_scale` feeds its guidance embedding, one transformer call per
  step, no classifier-free guidance (FLUX.1-schnell has no embedding and ignores it). SD3 runs classifier-free
  guidance as its pipeline does, unless `train.cfg` is off: then only the conditional branch, in sampling and training.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_unet_state_dict_to_peft
from ml_collections import ConfigDict
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from rebel_diffusion.policies.diffusion import (WindowedDiffusionPolicy, check_model_path, check_options,
                                                config_options, hub_pipeline_class, load_pipeline, model_index, parse_window)

# The joint attention's image and text projections (Flow-GRPO's targets for SD3.5 and FLUX.1; in FLUX's single-stream
# blocks the suffixes match the attention's to_q, to_k and to_v).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SDE_TYPES = ("ode", "flow_sde", "cps")
PIPELINES = {"StableDiffusion3Pipeline": StableDiffusion3Pipeline, "FluxPipeline": FluxPipeline}
# The components a folder may lack, loaded as None when its model_index.json has none (SD3 without T5).
OPTIONAL_COMPONENTS = {"StableDiffusion3Pipeline": ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"),
                       "FluxPipeline": ("image_encoder", "feature_extractor")}


def ode_step(v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """diffusers' Euler step of the flow ODE: `x + (sigma_next - sigma) v`.

    Args:
        v: `(B, C, h, w)` the (guided) velocity at x; x: `(B, C, h, w)` the latent at sigma.
        sigma, sigma_next: the current and next sigma (0-dim), sigma_next < sigma.

    Returns:
        The next latent `(B, C, h, w)`.
    """
    dt = sigma_next - sigma
    return x + dt * v


def flow_sde_step(
    v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler-Maruyama step of Flow-GRPO's reverse SDE, as the Gaussian over the next latent.

    With `dt = sigma_next - sigma < 0` and `std_t = a sqrt(sigma / (1 - sigma))` (sigma = 1 replaced by sigma_next in
    the denominator): `mean = x + (v + std_t^2 / (2 sigma) (x + (1 - sigma) v)) dt`, `x_next = mean + std_t sqrt(-dt) eps`.

    Args:
        v: `(B, C, h, w)` the velocity; x: `(B, C, h, w)` the latent at sigma.
        sigma, sigma_next: current and next sigma (0-dim); noise_level: a > 0.

    Returns:
        The mean `(B, C, h, w)` and std (0-dim) `std_t sqrt(-dt)` of x_next.
    """
    dt = sigma_next - sigma
    std_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, std_t * torch.sqrt(-dt)


def cps_step(
    v: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One coefficients-preserving step: predict the clean latent x0 and the noise x1, then mix them at sigma_next.

    `std = sigma_next sin(a pi / 2)`, `x0 = x - sigma v`, `x1 = x + (1 - sigma) v`,
    `mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) x1`, `x_next = mean + std eps`.

    Args:
        v: `(B, C, h, w)` the velocity; x: `(B, C, h, w)` the latent at sigma.
        sigma, sigma_next: current and next sigma (0-dim); noise_level: a in (0, 1).

    Returns:
        The mean `(B, C, h, w)` and std (0-dim) of x_next.
    """
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0 = x - sigma * v
    x1 = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - std**2) * x1
    return mean, std


def stochastic_steps(sde: str, num_steps: int) -> int:
    """How many of the `num_steps` steps can carry noise: every one for flow_sde, all but the last for cps (whose std
    `sigma_next sin(a pi / 2)` is 0 at sigma_next = 0), none for the ODE."""
    return {"ode": 0, "flow_sde": num_steps, "cps": num_steps - 1}[sde]


def resolve_window(sde: str, noise_level: float, sde_window, num_steps: int) -> tuple[int, int]:
    """Check the sampling options and return the window as (first stochastic step, count); `()` = every step that can
    carry noise. Raises `ValueError` naming the config key."""
    if sde not in SDE_TYPES:
        raise ValueError(f"sample.sde must be one of {list(SDE_TYPES)}, got {sde!r}")
    if num_steps < 1:
        raise ValueError(f"model.num_steps must be at least 1, got {num_steps}")
    if sde != "ode" and not noise_level > 0:
        raise ValueError(f"sample.noise_level must be positive for sample.sde={sde!r}, got {noise_level}")
    if sde == "cps" and noise_level >= 1:
        raise ValueError(f"sample.noise_level must be below 1 for sample.sde='cps' (sin(a pi/2) < 1), got {noise_level}")
    return parse_window(sde_window, stochastic_steps(sde, num_steps), f"sample.sde={sde!r} with model.num_steps={num_steps}")


def check_cfg(cfg: object) -> None:
    """`ValueError` naming `train.cfg` unless it is a bool."""
    if not isinstance(cfg, bool):
        raise ValueError(f"train.cfg must be True or False (classifier-free guidance in sampling and training), "
                         f"got {cfg!r}")


def absent_components(path: str | Path, pipeline_class: str) -> dict[str, None]:
    """The optional components a local folder does not hold (SD3's T5 and its tokenizer, the image encoder), as `None`
    keyword arguments: diffusers loads a folder without them only when told so."""
    index = model_index(path)
    if not index:
        return {}
    return {name: None for name in OPTIONAL_COMPONENTS[pipeline_class] if (index.get(name) or [None])[0] is None}


def check_pipeline_family(path: str | Path) -> str | None:
    """The pipeline class a local folder holds (None for a Hub id); `ValueError` naming `model.pretrained` for another
    family, or a FLUX folder without T5 (its text context)."""
    index = model_index(path)
    name = index.get("_class_name")
    if name is not None and name not in PIPELINES:
        raise ValueError(f"model.pretrained {str(path)!r} holds a {name}, not a StableDiffusion3Pipeline or FluxPipeline: "
                         "policy 'flow_match' needs an SD3 or FLUX.1 pipeline (choose the policy that fits the model)")
    if name == "FluxPipeline" and (index.get("text_encoder_2") or [None])[0] is None:
        raise ValueError(f"model.pretrained {str(path)!r} is a FluxPipeline without text_encoder_2: policy 'flow_match' "
                         "needs FLUX's T5 encoder (its text context)")
    return name


def pipeline_class_of(path: str) -> str:
    """The pipeline class of a local folder or a Hub id, from its `model_index.json`, before any weights load;
    `ValueError` naming `model.pretrained` for another family, `FileNotFoundError` (one line) when unreadable."""
    check_model_path(path)
    name = check_pipeline_family(path)
    return name if name is not None else hub_pipeline_class(path, PIPELINES)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's tokens: each 2x2 patch of the latent, channel-major within the patch, in row-major patch order.

    Args:
        latents: `(B, C, h, w)` with h and w even.

    Returns:
        `(B, (h/2)(w/2), 4C)`, what `FluxPipeline._pack_latents` gives.
    """
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: `(B, (h/2)(w/2), 4C)` tokens to the `(B, C, h, w)` latent."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return patches.reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's position ids of the packed tokens `((h/2)(w/2), 3)`: (0, patch row, patch column), row-major like
    `pack_latents`, for the transformer's rotary embedding."""
    rows, columns = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def flux_schedule(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, image_seq_len: int,
                  device: torch.device) -> None:
    """Set the scheduler's sigmas as `FluxPipeline.__call__` does: `linspace(1, 1/N, N)` (unless the scheduler uses its
    own flow sigmas), time-shifted by `mu`, which grows linearly with the image's token count from `base_shift` at
    `base_image_seq_len` tokens to `max_shift` at `max_image_seq_len` (a larger image needs more time at high noise)."""
    config = scheduler.config
    sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * slope + (base_shift - slope * base_len)  # diffusers' calculate_shift, in its order of rounding
    if sigmas is None:
        scheduler.set_timesteps(num_steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)


class FlowMatchPolicy(WindowedDiffusionPolicy):
    """A LoRA-adapted `StableDiffusion3Pipeline` or `FluxPipeline` that samples trajectories and re-scores their
    stochastic steps.

    Implements `rebel_diffusion.policies.Policy`; the reference policy is the same transformer with the adapter off.

    Args:
        pipeline: a `StableDiffusion3Pipeline` (T5 may be absent) or `FluxPipeline`, with a
            `FlowMatchEulerDiscreteScheduler`.
        num_steps: inference steps.
        guidance_scale: SD3: classifier-free guidance as the pipeline does it (off at <= 1); FLUX.1-dev: the guidance
            embedding's input (the pipeline's `guidance_scale`), with no classifier-free guidance.
        resolution: side of the square images, in pixels.
        sde: "flow_sde", "cps" or "ode"; noise_level: a, the SDE's noise level.
        sde_window: (first stochastic step, count), or () for every step that can carry noise.
        logprob_reduction: "mean" over the C h w latent elements or "sum" (the exact density).
        lora_rank, lora_alpha, lora_init, lora_targets: the peft LoRA adapter on the transformer.
        max_sequence_length: T5 tokens (SD3 without T5: rows of zeros), as the pipeline's argument.
        cfg: `train.cfg`; False runs SD3's conditional branch only, in sampling and training (flow_grpo's "no cfg").
        decode_batch_size: images the VAE decodes at once; gradient_checkpointing: on the transformer.
        device, dtype: where it runs and the dtype of the frozen weights (LoRA weights stay float32).
    """

    config_keys = frozenset({
        "model.pretrained", "model.num_steps", "model.guidance_scale", "model.logprob_reduction", "lora.rank",
        "lora.alpha", "lora.init", "lora.targets", "resolution", "sample.decode_batch_size", "train.gradient_checkpointing",
        "sample.sde", "sample.noise_level", "sample.sde_window", "model.max_sequence_length", "train.cfg",
    })

    def __init__(
        self,
        pipeline: StableDiffusion3Pipeline | FluxPipeline,
        num_steps: int = 10,
        guidance_scale: float = 4.5,
        resolution: int = 512,
        sde: str = "flow_sde",
        noise_level: float = 0.7,
        sde_window: tuple[int, ...] = (),
        logprob_reduction: str = "mean",
        lora_rank: int = 8,
        lora_alpha: float = 8,
        lora_init: str | bool = "gaussian",
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        max_sequence_length: int = 256,
        cfg: bool = True,
        decode_batch_size: int = 4,
        gradient_checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_options(logprob_reduction, decode_batch_size)
        check_cfg(cfg)
        self.window_start, self.window_size = resolve_window(sde, noise_level, sde_window, num_steps)
        if not isinstance(pipeline, tuple(PIPELINES.values())):
            raise ValueError(f"a {type(pipeline).__name__} is not a StableDiffusion3Pipeline or FluxPipeline")
        if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"the pipeline's scheduler is a {type(pipeline.scheduler).__name__}, not the "
                             "FlowMatchEulerDiscreteScheduler whose sigmas the flow steps integrate")
        self.is_flux = isinstance(pipeline, FluxPipeline)
        if self.is_flux and max_sequence_length > 512:  # the T5 length FluxPipeline accepts at most
            raise ValueError(f"model.max_sequence_length must be at most 512 for FLUX, got {max_sequence_length}")
        patch = 2 if self.is_flux else pipeline.patch_size  # FLUX packs 2x2 latent patches into tokens
        if resolution % (pipeline.vae_scale_factor * patch) != 0:
            raise ValueError(f"resolution {resolution} must be divisible by the VAE's {pipeline.vae_scale_factor} times "
                             f"the patch size {patch}")
        self.pipeline = pipeline
        self.num_steps, self.guidance_scale, self.resolution, self.cfg = num_steps, guidance_scale, resolution, cfg
        self.sde, self.noise_level, self.logprob_reduction = sde, noise_level, logprob_reduction
        self.max_sequence_length, self.decode_batch_size = max_sequence_length, decode_batch_size
        self.device = torch.device(device) if device is not None else pipeline.device
        self.dtype = dtype
        self.vae, self.transformer = pipeline.vae, pipeline.transformer
        encoders = [pipeline.text_encoder, pipeline.text_encoder_2, getattr(pipeline, "text_encoder_3", None)]
        self._adapt(self.transformer, encoders, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=lora_init,
                                                           target_modules=list(lora_targets)), gradient_checkpointing)

        scheduler = pipeline.scheduler
        side = resolution // pipeline.vae_scale_factor
        if self.is_flux:
            flux_schedule(scheduler, num_steps, (side // 2) ** 2, self.device)
            self.image_ids = latent_image_ids(side, side, self.device, dtype)  # ((side/2)^2, 3)
            # FLUX.1-dev's distilled guidance: the scale is an input of the transformer (the pipeline's float32 (1,)).
            self.guidance = (torch.full([1], guidance_scale, device=self.device, dtype=torch.float32)
                             if self.transformer.config.guidance_embeds else None)
        else:
            kwargs = {}
            if scheduler.config.get("use_dynamic_shifting", False):  # as the pipeline computes mu from the token count
                tokens = side // pipeline.patch_size
                kwargs["mu"] = calculate_shift(
                    tokens * tokens, scheduler.config.get("base_image_seq_len", 256),
                    scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                    scheduler.config.get("max_shift", 1.16),
                )
            scheduler.set_timesteps(num_steps, device=self.device, **kwargs)
        self.timesteps = scheduler.timesteps.clone()  # (N,) sigma * num_train_timesteps
        self.sigmas = scheduler.sigmas.clone().to(self.device)  # (N + 1,) shifted sigmas, ending at 0
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance: SD3's, above a scale of 1, unless `train.cfg` is off; never FLUX's (its
        `guidance_scale` is the guidance embedding's input)."""
        return self.cfg and not self.is_flux and self.guidance_scale > 1

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, **options
    ) -> FlowMatchPolicy:
        """Load a `StableDiffusion3Pipeline` (with or without T5) or a `FluxPipeline`, a Hub id or a local folder, the
        class its `model_index.json` names, and wrap it; `options` as in __init__."""
        path = str(model_id_or_path)
        resolve_window(options.get("sde", "flow_sde"), options.get("noise_level", 0.7), options.get("sde_window", ()),
                       options.get("num_steps", 10))  # bad options fail before the model loads
        check_cfg(options.get("cfg", True))
        name = pipeline_class_of(path)
        pipeline = load_pipeline(PIPELINES[name], path, dtype, **absent_components(path, name))
        return cls(pipeline, device=device, dtype=dtype, **options)

    @staticmethod
    def check_config(config: ConfigDict) -> None:
        """`ValueError` naming the key for bad sampling options, a bad `train.cfg` or a pipeline folder of another
        family, before any model loads."""
        sample = config.sample
        resolve_window(sample.get("sde", "flow_sde"), sample.get("noise_level", 0.7), sample.get("sde_window", ()),
                       config.model.num_steps)
        if sample.get("sde", "flow_sde") == "ode":
            raise ValueError("sample.sde='ode' is deterministic: it has no log-probs to train; use 'flow_sde' or 'cps'")
        check_cfg(config.train.get("cfg", True))
        check_pipeline_family(config.model.pretrained)

    @classmethod
    def from_config(cls, config: ConfigDict, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> FlowMatchPolicy:
        """The policy a training config describes (`model.*`, `lora.*`, `resolution`, `sample.sde*`,
        `sample.noise_level`, `sample.decode_batch_size`, `train.gradient_checkpointing`, `train.cfg`,
        `model.max_sequence_length`)."""
        cls.check_config(config)
        return cls.from_pretrained(config.model.pretrained, device=device, dtype=dtype, sde=config.sample.sde,
                                   noise_level=config.sample.noise_level, sde_window=tuple(config.sample.sde_window),
                                   max_sequence_length=config.model.get("max_sequence_length", 256),
                                   cfg=config.train.get("cfg", True), **config_options(config, LORA_TARGETS))

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_flux:  # T5's sequence `(L, D)` is the context, CLIP's pooled output `(P,)` the pooled projection
            embeds, pooled, _ = self.pipeline.encode_prompt(prompt=[prompt], prompt_2=None, device=self.device,
                                                            num_images_per_prompt=1,
                                                            max_sequence_length=self.max_sequence_length)
            return embeds[0], pooled[0]
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return embeds[0], pooled[0]

    def _negative_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cached("")  # SD3's negative prompt defaults to ""

    def _call_denoiser(self, network: torch.nn.Module, model_input: torch.Tensor, step: int, embeds: torch.Tensor,
                       pooled: torch.Tensor) -> torch.Tensor:
        batch = len(model_input)
        if not self.is_flux:
            return network(hidden_states=model_input, timestep=self.timesteps[step].expand(batch),
                           encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        # FLUX: the timestep in [0, 1] (cast to the latents' dtype before the division, as the pipeline does), the
        # packed tokens with their position ids, and T5's tokens at position (0, 0, 0).
        timestep = self.timesteps[step].expand(batch).to(model_input.dtype) / 1000
        guidance = self.guidance.expand(batch) if self.guidance is not None else None
        h, w = model_input.shape[-2:]
        tokens = network(hidden_states=pack_latents(model_input), timestep=timestep, guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=embeds,
                         txt_ids=embeds.new_zeros(embeds.shape[1], 3), img_ids=self.image_ids, return_dict=False)[0]
        return unpack_latents(tokens, h, w)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """`(B, C, h, w)` of the latents of `resolution`-pixel images; FLUX's transformer takes 4C channels (a packed
        2x2 patch per token)."""
        side = self.resolution // self.pipeline.vae_scale_factor
        channels = self.transformer.config.in_channels // (4 if self.is_flux else 1)
        return batch, channels, side, side

    def _gaussian(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor,
                  reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean `(B, C, h, w)`, std 0-dim) of the stochastic step `step` (a scheduler index)."""
        v = self.guided_prediction(latents, step, conditioning, reference)
        step_fn = flow_sde_step if self.sde == "flow_sde" else cps_step
        return step_fn(v, latents.float(), self.sigmas[step], self.sigmas[step + 1], self.noise_level)

    def _deterministic_step(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor) -> torch.Tensor:
        v = self.guided_prediction(latents, step, conditioning)
        return ode_step(v, latents, self.sigmas[step], self.sigmas[step + 1])

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The transformer's LoRA weights in peft's naming, what `save_lora_weights` takes for SD3 and FLUX."""
        return get_peft_model_state_dict(self.transformer)

    def save_lora(self, directory: str | Path) -> None:
        """Write `pytorch_lora_weights.safetensors`, loadable with the pipeline class's `load_lora_weights`
        (`StableDiffusion3Pipeline` or `FluxPipeline`). The adapter's config goes in the file's metadata: without it
        diffusers loads the weights with alpha = rank, and any other `lora.alpha` would scale the update wrongly."""
        type(self.pipeline).save_lora_weights(
            directory, transformer_lora_layers=self.lora_state_dict(),
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict())

    def load_lora(self, directory: str | Path) -> None:
        """Load LoRA weights written by `save_lora` into this policy's adapter."""
        state = type(self.pipeline).lora_state_dict(str(directory))
        state = state[0] if isinstance(state, tuple) else state  # (state, alphas) in some diffusers versions
        transformer_state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        result = set_peft_model_state_dict(self.transformer, convert_unet_state_dict_to_peft(transformer_state))
        if result is not None and getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA weights in {directory} do not fit this transformer: {result.unexpected_keys[:3]}")
        cast_training_params(self.transformer, dtype=torch.float32)
