"""DDIM sampling of Stable Diffusion 1.5 and SDXL at eta > 0 as a Markov decision process (DDPO's setting).

DDIM (Song et al. 2021) steps from x_t to x_prev, the latent of the scheduler's next timestep, with the Gaussian

    x_prev ~ N(sqrt(alpha_prod_t_prev) x0_pred + sqrt(1 - alpha_prod_t_prev - std_dev_t^2) eps_pred, std_dev_t^2 I),
    std_dev_t = eta sqrt((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) sqrt(1 - alpha_prod_t / alpha_prod_t_prev),

where eps_pred is the UNet's guided noise prediction and x0_pred the clean latent it implies. At eta = 0 the step is
deterministic (DDIM's ODE); at eta > 0 every step, the last one included (its alpha_prod_t_prev is the scheduler's
final alpha), is a stochastic action with a log-prob. This is what `DDIMScheduler.step(..., eta=eta)` does inside
`StableDiffusionPipeline` / `StableDiffusionXLPipeline(..., eta=eta)`, and the sampler draws the same noise from the
generator in the same order, so that its images equal the pipeline's.

As in `FlowMatchPolicy`, only the steps of the window `sample.sde_window` (first step, count) are actions; the others
are eta = 0 steps, not trained. This is how DDPO's `train.timestep_fraction` (train on a fraction of the steps) is set
here, with one difference: DDPO trains a random subset of the steps of each trajectory, here the window is a fixed
contiguous range, and the steps outside it carry no noise. The policy is a LoRA adapter on the UNet's attention
projections; the VAE, the text encoders and the base weights stay frozen, and the reference is the UNet with the
adapter off. The pipeline's scheduler (PNDM for SD 1.5, Euler for SDXL) is replaced by a `DDIMScheduler` built from its
config, as DDPO does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from ml_collections import ConfigDict
from peft import LoraConfig

from rebel_diffusion.policies.diffusion import (WindowedDiffusionPolicy, check_model_path, check_options,
                                                config_options, hub_pipeline_class, load_pipeline, load_unet_lora,
                                                model_index, parse_window, predicted_original_sample, save_unet_lora)
from rebel_diffusion.policies.lcm import LORA_TARGETS

PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
# What `from_pretrained` passes each family: no safety checker (the policy's images are the raw decode), no invisible
# watermark on SDXL (the pipeline adds it only with the package installed; the policy's images never have it).
LOAD_OPTIONS = {"StableDiffusionPipeline": {"safety_checker": None, "requires_safety_checker": False},
                "StableDiffusionXLPipeline": {"add_watermarker": False}}


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    eta: float,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from x_t, as the Gaussian over x_prev (Song et al. 2021, eq. 12 and 16).

    Args:
        model_output: `(B, C, h, w)` the (guided) UNet prediction at t; sample: `(B, C, h, w)` the latent x_t.
        alpha_prod_t, alpha_prod_t_prev: cumulative alphas at t and at the previous (less noisy) timestep (0-dim).
        eta: the noise scale, 0 (DDIM) to 1 (DDPM's posterior variance).
        prediction_type: "epsilon", "sample" or "v_prediction"; clip_sample_range: clamp x0_pred to +-this when set.

    Returns:
        The mean `(B, C, h, w)` and std_dev_t (0-dim) of x_prev.
    """
    pred_original_sample, pred_epsilon = predicted_original_sample(model_output, sample, alpha_prod_t, prediction_type)
    if clip_sample_range is not None:  # the clamped x0 with the unclamped eps, as the scheduler does by default
        pred_original_sample = pred_original_sample.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.sqrt()
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).sqrt() * pred_epsilon
    return alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction, std_dev_t


def resolve_window(eta: float, sde_window, num_steps: int) -> tuple[int, int]:
    """Check eta and the window and return it as (first stochastic step, count); `()` = every step (none at eta = 0).
    Raises `ValueError` naming the config key."""
    if num_steps < 1:
        raise ValueError(f"model.num_steps must be at least 1, got {num_steps}")
    if not 0 <= eta <= 1:  # above 1, 1 - alpha_prod_t_prev - std_dev_t^2 can be negative
        raise ValueError(f"sample.eta must be in [0, 1] (0: DDIM's deterministic step, 1: DDPM's variance), got {eta}")
    return parse_window(sde_window, num_steps if eta > 0 else 0, f"sample.eta={eta} with model.num_steps={num_steps}")


def check_pipeline_family(path: str | Path) -> str | None:
    """The pipeline class a local folder holds (None for a Hub id); `ValueError` naming `model.pretrained` for another
    family or an SDXL folder without its second text encoder."""
    index = model_index(path)
    name = index.get("_class_name")
    if name is not None and name not in PIPELINES:
        raise ValueError(f"model.pretrained {str(path)!r} holds a {name}, not a StableDiffusionPipeline or "
                         "StableDiffusionXLPipeline: policy 'ddim' needs an SD 1.5 or SDXL pipeline (choose the policy "
                         "that fits the model)")
    if name == "StableDiffusionXLPipeline" and ((index.get("text_encoder_2") or [None])[0] is None
                                                or not (Path(path).expanduser() / "text_encoder_2").is_dir()):
        raise ValueError(f"model.pretrained {str(path)!r} is an SDXL pipeline without text_encoder_2: policy 'ddim' "
                         "needs both text encoders (the pooled embedding and half the context come from the second)")
    return name


class DDIMPolicy(WindowedDiffusionPolicy):
    """A LoRA-adapted `StableDiffusionPipeline` or `StableDiffusionXLPipeline` sampled with DDIM at eta.

    Implements `rebel_diffusion.policies.Policy`; the reference policy is the same UNet with the adapter off.

    Args:
        pipeline: an SD 1.5-style or SDXL pipeline (any scheduler: it is replaced by a `DDIMScheduler` of its config).
        num_steps: inference steps; guidance_scale: classifier-free guidance as the pipeline does it (off at <= 1).
        resolution: side of the square images, in pixels.
        eta: DDIM's noise scale in [0, 1]; 0 samples the deterministic DDIM chain (no actions).
        sde_window: (first stochastic step, count), or () for every step.
        logprob_reduction: "mean" over latent dims (DDPO's scale) or "sum" (the exact density).
        lora_rank, lora_alpha, lora_init, lora_targets: the peft LoRA adapter on the UNet.
        decode_batch_size: images the VAE decodes at once; gradient_checkpointing: on the UNet.
        device, dtype: where it runs and the dtype of the frozen weights (LoRA weights stay float32).
    """

    config_keys = frozenset({
        "model.pretrained", "model.num_steps", "model.guidance_scale", "model.logprob_reduction", "lora.rank",
        "lora.alpha", "lora.init", "lora.targets", "resolution", "sample.decode_batch_size", "train.gradient_checkpointing",
        "sample.eta", "sample.sde_window",
    })

    def __init__(
        self,
        pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline,
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        resolution: int = 512,
        eta: float = 1.0,
        sde_window: tuple[int, ...] = (),
        logprob_reduction: str = "mean",
        lora_rank: int = 8,
        lora_alpha: float = 8,
        lora_init: str | bool = "gaussian",
        lora_targets: tuple[str, ...] = LORA_TARGETS,
        decode_batch_size: int = 4,
        gradient_checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_options(logprob_reduction, decode_batch_size)
        self.window_start, self.window_size = resolve_window(eta, sde_window, num_steps)
        if not isinstance(pipeline, tuple(PIPELINES.values())):
            raise ValueError(f"a {type(pipeline).__name__} is not a StableDiffusionPipeline or StableDiffusionXLPipeline")
        self.is_xl = isinstance(pipeline, StableDiffusionXLPipeline)
        if self.is_xl and pipeline.text_encoder_2 is None:
            raise ValueError("the SDXL pipeline has no text_encoder_2: its pooled embedding comes from the second encoder")
        if pipeline.unet.config.time_cond_proj_dim is not None:
            raise ValueError("the UNet has a time_cond_proj_dim (a guidance-distilled LCM UNet): use policy 'lcm'")
        if self.is_xl and pipeline.vae.config.get("latents_mean") is not None:
            raise ValueError("a VAE with latents_mean/latents_std (not SDXL base's) is not supported by DDIMPolicy")
        if resolution % pipeline.vae_scale_factor != 0:
            raise ValueError(f"resolution {resolution} must be divisible by the VAE's {pipeline.vae_scale_factor}")
        scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        if scheduler.config.thresholding:
            raise ValueError("DDIMScheduler thresholding is not supported by DDIMPolicy")
        pipeline.scheduler = scheduler  # the pipeline then samples as the policy does (at eta=eta)

        self.pipeline = pipeline
        self.num_steps, self.guidance_scale, self.resolution, self.eta = num_steps, guidance_scale, resolution, eta
        self.logprob_reduction, self.decode_batch_size = logprob_reduction, decode_batch_size
        self.device = torch.device(device) if device is not None else pipeline.device
        self.dtype = dtype
        self.vae, self.unet = pipeline.vae, pipeline.unet
        self._adapt(self.unet, [pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)],
                    LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=lora_init,
                               target_modules=list(lora_targets)), gradient_checkpointing)
        if self.is_xl and dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; its pipeline decodes in fp32 too

        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.to(self.device)
        # The scheduler's previous timestep is t - T // N (below 0: its final alpha, alphas_cumprod[0] for SD and SDXL).
        alphas_cumprod = scheduler.alphas_cumprod.float().to(self.device)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=self.device)
        stride = scheduler.config.num_train_timesteps // num_steps
        self.alpha_prod = [(alphas_cumprod[t], alphas_cumprod[t - stride] if t >= stride else final)
                           for t in scheduler.timesteps.tolist()]
        self.prediction_type = scheduler.config.prediction_type
        self.clip_sample_range = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
        # SDXL's micro-conditioning: (original size, crop top-left, target size), here the square image uncropped.
        self.add_time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=self.device,
                                         dtype=dtype)
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, **options
    ) -> DDIMPolicy:
        """Load an SD 1.5-style or SDXL pipeline (a Hub id or a local folder) and wrap it; `options` as in __init__."""
        path = str(model_id_or_path)
        check_model_path(path)
        name = check_pipeline_family(path)
        resolve_window(options.get("eta", 1.0), options.get("sde_window", ()), options.get("num_steps", 50))
        if name is None:  # a Hub id (or a folder without model_index.json): its model_index.json says the class
            name = hub_pipeline_class(path, PIPELINES)
        pipeline = load_pipeline(PIPELINES[name], path, dtype, **LOAD_OPTIONS[name])
        return cls(pipeline, device=device, dtype=dtype, **options)

    @staticmethod
    def check_config(config: ConfigDict) -> None:
        """`ValueError` naming the key for a bad eta or window, or a pipeline folder of another family, before any
        model loads."""
        eta = config.sample.get("eta", 1.0)
        resolve_window(eta, config.sample.get("sde_window", ()), config.model.num_steps)
        if eta == 0:
            raise ValueError("sample.eta=0 is DDIM's deterministic step: it has no log-probs to train; set sample.eta "
                             "in (0, 1] (DDPO uses 1.0)")
        check_pipeline_family(config.model.pretrained)

    @classmethod
    def from_config(cls, config: ConfigDict, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> DDIMPolicy:
        """The policy a training config describes (`model.*`, `lora.*`, `resolution`, `sample.eta`,
        `sample.sde_window`, `sample.decode_batch_size`, `train.gradient_checkpointing`)."""
        cls.check_config(config)
        return cls.from_pretrained(config.model.pretrained, device=device, dtype=dtype, eta=config.sample.eta,
                                   sde_window=tuple(config.sample.sde_window), **config_options(config, LORA_TARGETS))

    def _encode_with_negative(self, prompt: str) -> tuple[torch.Tensor, ...]:
        """(embeds `(1, L, D)`, negative `(1, L, D)`, pooled `(1, P)`, negative pooled `(1, P)`) from the pipeline's
        own `encode_prompt` with guidance on and no negative prompt; P = 0 for SD 1.5."""
        if self.is_xl:
            return self.pipeline.encode_prompt(prompt=[prompt], device=self.device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
        embeds, negative = self.pipeline.encode_prompt([prompt], self.device, 1, True)
        return embeds, negative, embeds.new_zeros((1, 0)), embeds.new_zeros((1, 0))

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self._encode_with_negative(prompt)
        return embeds[0], pooled[0]

    def _negative_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        # SD 1.5 encodes "", SDXL base zeros both (force_zeros_for_empty_prompt): whatever the pipeline does.
        if self._negative is None:
            _, negative, _, negative_pooled = self._encode_with_negative("")
            self._negative = (negative[0], negative_pooled[0])
        return self._negative

    def _call_denoiser(self, network: torch.nn.Module, model_input: torch.Tensor, step: int, embeds: torch.Tensor,
                       pooled: torch.Tensor) -> torch.Tensor:
        added = {"text_embeds": pooled, "time_ids": self.add_time_ids.expand(len(model_input), -1)} if self.is_xl else None
        return network(model_input, self.timesteps[step], encoder_hidden_states=embeds, added_cond_kwargs=added,
                       return_dict=False)[0]

    def _step(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor, eta: float,
              reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.guided_prediction(latents, step, conditioning, reference)
        alpha_prod_t, alpha_prod_t_prev = self.alpha_prod[step]
        return ddim_step(eps, latents.float(), alpha_prod_t, alpha_prod_t_prev, eta, self.prediction_type,
                         self.clip_sample_range)

    def _gaussian(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor,
                  reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step(latents, step, conditioning, self.eta, reference)

    def _deterministic_step(self, latents: torch.Tensor, step: int, conditioning: torch.Tensor) -> torch.Tensor:
        return self._step(latents, step, conditioning, 0.0)[0]

    def save_lora(self, directory: str | Path) -> None:
        """Write `pytorch_lora_weights.safetensors`, loadable with the pipeline class's `load_lora_weights`."""
        save_unet_lora(type(self.pipeline), self.unet, directory)

    def load_lora(self, directory: str | Path) -> None:
        """Load LoRA weights written by `save_lora` into this policy's adapter."""
        load_unet_lora(type(self.pipeline), self.unet, directory)
