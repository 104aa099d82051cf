"""The latent consistency model sampling chain as a Markov decision process.

Multistep LCM sampling (Luo et al. 2023) alternates a consistency jump to the clean latent and a re-noising to the next
timestep. Seen as a policy, each of the first T-1 steps draws the next latent from the Gaussian

    x_prev ~ N(sqrt(alpha_prod_t_prev) * denoised(x_t, t), (1 - alpha_prod_t_prev) I),

exactly as diffusers' `LCMScheduler.step` does; the last step is deterministic and its `denoised` is decoded to the
image. The policy is a LoRA adapter on the UNet; VAE, text encoder and base UNet stay frozen.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import LatentConsistencyModelPipeline
from diffusers.utils.torch_utils import randn_tensor
from ml_collections import ConfigDict
from peft import LoraConfig
from tqdm.auto import tqdm

# Re-exported: the LCM chain's Gaussian, its KL and the LoRA helpers were first written here.
from rebel_diffusion.policies.diffusion import (ImageOutputs, _adapters_disabled, check_options, config_options,
                                                freeze_and_add_lora, gaussian_kl, gaussian_log_prob, load_pipeline,
                                                load_unet_lora, merged_lora, model_index, predicted_original_sample,
                                                save_unet_lora)
from rebel_diffusion.trajectory import Trajectory

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lcm_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the LCM chain, as the policy's Gaussian.

    Args:
        model_output: `(B, C, h, w)` the UNet's prediction at timestep t.
        sample: `(B, C, h, w)` the latent x_t.
        alpha_prod_t, alpha_prod_t_prev: cumulative alphas at t and at the next timestep of the chain (0-dim).
        c_skip, c_out: the consistency boundary-condition scalings at t (0-dim).
        prediction_type: what the UNet predicts: "epsilon", "sample" or "v_prediction".
        clip_sample_range: clamp the predicted clean latent to +-this when set (the scheduler's `clip_sample`).

    Returns:
        `denoised` `(B, C, h, w)`, and the mean `(B, C, h, w)` and std (0-dim) of the Gaussian over the next latent.
    """
    x0, _ = predicted_original_sample(model_output, sample, alpha_prod_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    denoised = c_out * x0 + c_skip * sample
    mean = alpha_prod_t_prev.sqrt() * denoised
    std = (1 - alpha_prod_t_prev).sqrt()
    return denoised, mean, std


def check_pipeline_family(path: str | Path) -> None:
    """`ValueError` naming `model.pretrained` when a local folder's `model_index.json` names another pipeline class;
    a Hub id (or a folder without that file) is left to `LatentConsistencyModelPipeline.from_pretrained`."""
    name = model_index(path).get("_class_name")
    if name is not None and name != "LatentConsistencyModelPipeline":
        raise ValueError(f"model.pretrained {str(path)!r} holds a {name}, not a LatentConsistencyModelPipeline: policy "
                         "'lcm' needs an LCM pipeline (ddim takes SD 1.5 and SDXL, flow_match SD3 and FLUX.1)")


def peak_memory_mb(device: torch.device | str) -> float | None:
    """The most memory torch's CUDA allocator held on `device` since the last `reset_peak_memory_stats`, in MiB;
    None elsewhere, where torch keeps no such counter."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


class LCMPolicy(ImageOutputs):
    """A LoRA-adapted `LatentConsistencyModelPipeline` that samples trajectories and re-scores their steps.

    Implements `rebel_diffusion.policies.Policy`; the reference policy is the same UNet with the adapter disabled.

    Args:
        pipeline: any diffusers `LatentConsistencyModelPipeline` (its scheduler must be an `LCMScheduler`).
        num_steps: inference steps of the chain; the first `num_steps - 1` are stochastic actions.
        guidance_scale: fed through the UNet's w-embedding (no classifier-free batch doubling).
        resolution: side of the square images, in pixels.
        logprob_reduction: "mean" over latent dims (default; what eta = 1 assumes) or "sum" (the exact density).
        lora_rank, lora_alpha, lora_init, lora_targets: the peft LoRA adapter on the UNet's attention projections.
        decode_batch_size: images the VAE decodes at once: its activations at full resolution, not the UNet's, set
            the sampling peak and grow with the batch; decoding in slices gives the same images.
        gradient_checkpointing: recompute the UNet's block activations in the backward pass instead of storing them
            (less memory for `log_prob`, about one more forward in time).
        device: where the pipeline runs; dtype: the dtype of the frozen weights (LoRA weights stay float32).
    """

    kind = "image"
    config_keys = frozenset({
        "model.pretrained", "model.num_steps", "model.guidance_scale", "model.logprob_reduction", "lora.rank",
        "lora.alpha", "lora.init", "lora.targets", "resolution", "sample.decode_batch_size", "train.gradient_checkpointing",
    })
    has_reference = True  # the UNet with its LoRA adapter disabled

    def __init__(
        self,
        pipeline: LatentConsistencyModelPipeline,
        num_steps: int = 8,
        guidance_scale: float = 8.0,
        resolution: int = 512,
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
        if num_steps < 2:
            raise ValueError(f"num_steps must be at least 2 (one stochastic step), got {num_steps}")
        scheduler = pipeline.scheduler
        if scheduler.config.get("thresholding", False):
            raise ValueError("LCMScheduler thresholding is not supported by LCMPolicy")
        if pipeline.unet.config.time_cond_proj_dim is None:
            raise ValueError("the UNet has no time_cond_proj_dim: it is not an LCM with a guidance (w) embedding")
        if resolution % 8 != 0 or resolution % pipeline.vae_scale_factor != 0:
            raise ValueError(f"resolution {resolution} must be divisible by 8 and by the VAE's {pipeline.vae_scale_factor}")

        self.pipeline = pipeline
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.logprob_reduction = logprob_reduction
        self.decode_batch_size = decode_batch_size
        self.device = torch.device(device) if device is not None else pipeline.device
        self.dtype = dtype
        self.vae, self.text_encoder = pipeline.vae, pipeline.text_encoder
        self.lora_sites = freeze_and_add_lora(
            pipeline.unet, [self.vae, self.text_encoder], self.device, dtype,
            LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=lora_init, target_modules=list(lora_targets)),
            gradient_checkpointing,
        )
        # A fp32 LoRA merged into half-precision weights rounds W + delta to bf16/fp16, which the unmerged forward
        # never does: sampled and recomputed log-probs would then disagree. Merge only where that rounding is fp32's.
        self.merge_for_sampling = dtype == torch.float32
        # The trainer may swap in a DistributedDataParallel wrapper; every trained call goes through this attribute.
        self.model = pipeline.unet

        scheduler.set_timesteps(num_steps, device="cpu")
        self.timesteps = scheduler.timesteps.clone()
        alphas_cumprod = scheduler.alphas_cumprod.float()
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
        self.step_constants = []
        for i, t in enumerate(self.timesteps):
            prev_t = self.timesteps[i + 1] if i + 1 < num_steps else t
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
            self.step_constants.append(
                {
                    "alpha_prod_t": alphas_cumprod[t],
                    "alpha_prod_t_prev": alphas_cumprod[prev_t] if prev_t >= 0 else final,
                    "c_skip": torch.as_tensor(c_skip, dtype=torch.float32),
                    "c_out": torch.as_tensor(c_out, dtype=torch.float32),
                }
            )
        # Everything a step needs lives on the device once, not copied at every UNet call.
        self.step_constants = [{k: v.to(self.device) for k, v in c.items()} for c in self.step_constants]
        self.timesteps = self.timesteps.to(self.device)
        self.prediction_type = scheduler.config.prediction_type
        self.clip_sample_range = scheduler.config.clip_sample_range if scheduler.config.get("clip_sample") else None
        w = torch.tensor([guidance_scale - 1.0])
        self.w_embedding = pipeline.get_guidance_scale_embedding(w, pipeline.unet.config.time_cond_proj_dim).to(
            self.device, dtype
        )
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, **options
    ) -> LCMPolicy:
        """Load a `LatentConsistencyModelPipeline` (a Hub id or a local folder) and wrap it; `options` as in __init__.
        A folder of another family is refused before anything loads."""
        check_pipeline_family(model_id_or_path)
        pipeline = load_pipeline(LatentConsistencyModelPipeline, str(model_id_or_path), dtype, safety_checker=None,
                                 requires_safety_checker=False)
        return cls(pipeline, device=device, dtype=dtype, **options)

    @classmethod
    def from_config(cls, config: ConfigDict, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> LCMPolicy:
        """The policy a training config describes (`model.*`, `lora.*`, `resolution`, `sample.decode_batch_size`,
        `train.gradient_checkpointing`)."""
        return cls.from_pretrained(config.model.pretrained, device=device, dtype=dtype,
                                   **config_options(config, LORA_TARGETS))

    @staticmethod
    def check_config(config: ConfigDict) -> None:
        """`ValueError` naming `model.pretrained` for a pipeline folder of another family, before any model loads."""
        check_pipeline_family(config.model.pretrained)

    @property
    def num_actions(self) -> int:
        """T: the stochastic steps, each with a log-probability."""
        return self.num_steps - 1

    def check_prompts(self, prompts: list[str]) -> None:
        """Any text is a valid prompt: the CLIP tokenizer truncates at its context length, as the pipeline does."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights."""
        return [p for p in self.pipeline.unet.parameters() if p.requires_grad]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder states `(B, L, D)`, computed once per distinct prompt and cached.

        Each prompt is encoded on its own so that its embedding never depends on what it was batched with (a resumed
        run then reproduces an uninterrupted one bit for bit).
        """
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._prompt_cache:
                self._prompt_cache[prompt] = self.pipeline.encode_prompt([prompt], self.device, 1, False)[0][0]
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def step_chunks(self) -> list[range]:
        """One chain step per graph: the trainer holds a single UNet graph at a time."""
        return [range(step, step + 1) for step in range(self.num_actions)]

    def _denoise(
        self, latents: torch.Tensor, step: int, prompt_embeds: torch.Tensor, reference: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """UNet call plus `lcm_step` at chain index `step` -> (denoised, mean, std), float32.

        `reference` runs the base UNet (adapter disabled) without grad, for the KL to the base model.
        """
        t = self.timesteps[step]
        w_embedding = self.w_embedding.expand(len(latents), -1)
        unet = self.pipeline.unet if reference else self.model
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32), \
                _adapters_disabled(unet, reference), torch.set_grad_enabled(torch.is_grad_enabled() and not reference):
            model_output = unet(
                latents.to(self.dtype), t, timestep_cond=w_embedding, encoder_hidden_states=prompt_embeds, return_dict=False
            )[0]
        return lcm_step(model_output.float(), latents.float(), **self.step_constants[step], prediction_type=self.prediction_type,
                        clip_sample_range=self.clip_sample_range)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None, with_kl: bool = False,
               progress: bool = False) -> Trajectory:
        """Run the chain for `prompts` and record it.

        Initial latents and per-step noise are drawn in the pipeline's order from `generator`, so the images equal
        `pipeline(prompts, num_inference_steps, guidance_scale, generator=generator, output_type="pt").images`.
        `with_kl` also runs the base UNet at every stochastic step and records `ln pi(a_t|s_t) - ln pi_ref(a_t|s_t)` at
        the sampled action (k1, an unbiased estimate of the step's KL, the one that is right as a reward term).

        Returns:
            A `Trajectory` with `states`/`actions` `(B, T, C, h, w)`, `log_probs` `(B, T)` (T = num_steps - 1),
            `outputs` the images `(B, 3, H, W)` in [0, 1], `conditioning` the prompt embeddings and, with `with_kl`,
            `kl` `(B, T)`.
        """
        prompt_embeds = self.encode_prompts(prompts)
        side = self.resolution // self.pipeline.vae_scale_factor
        shape = (len(prompts), self.pipeline.unet.config.in_channels, side, side)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        latents = latents * self.pipeline.scheduler.init_noise_sigma
        chain, means, stds, log_probs = [latents], [], [], []
        with merged_lora(self.lora_sites) if self.merge_for_sampling else contextlib.nullcontext():
            for step in tqdm(range(self.num_steps), desc="chain", leave=False, disable=not progress):
                denoised, mean, std = self._denoise(chain[-1], step, prompt_embeds)
                if step == self.num_steps - 1:
                    break
                noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
                next_latents = mean + std * noise
                log_probs.append(gaussian_log_prob(next_latents, mean, std, self.logprob_reduction))
                means.append(mean)
                stds.append(std)
                chain.append(next_latents)
        # The reference needs the unmerged weights with the adapter off, so its passes run after the chain. As a reward
        # term the KL must be the sampled log-ratio (k1): its score-function gradient is the trajectory KL's gradient,
        # while the exact per-state Gaussian KL would miss the KL's dependence on theta at fixed states.
        kls = [
            log_prob - gaussian_log_prob(action, self._denoise(state, step, prompt_embeds, reference=True)[1], std,
                                         self.logprob_reduction)
            for step, (state, action, std, log_prob) in enumerate(zip(chain, chain[1:], stds, log_probs))
        ] if with_kl else []
        images = self.decode(denoised)
        latents = torch.stack(chain, dim=1)
        log_probs = torch.stack(log_probs, dim=1)
        return Trajectory(
            prompts=list(prompts),
            states=latents[:, :-1],
            actions=latents[:, 1:],
            log_probs=log_probs,
            mask=torch.ones_like(log_probs, dtype=torch.bool),
            outputs=images,
            conditioning=prompt_embeds,
            kl=torch.stack(kls, dim=1) if with_kl else None,
        )

    def log_prob(
        self, trajectory: Trajectory, steps: range, with_kl: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi_theta(a_t | s_t) `(B, len(steps))` under the current weights, with grad; with `with_kl` also the
        per-step `gaussian_kl` to the base UNet `(B, len(steps))` (grad through the adapted side only)."""
        log_probs, kls = [], []
        for step in steps:
            state, conditioning = trajectory.states[:, step], trajectory.conditioning
            _, mean, std = self._denoise(state, step, conditioning)
            log_probs.append(gaussian_log_prob(trajectory.actions[:, step].float(), mean, std, self.logprob_reduction))
            if with_kl:
                _, mean_ref, _ = self._denoise(state, step, conditioning, reference=True)
                kls.append(gaussian_kl(mean, mean_ref, std, self.logprob_reduction))
        return torch.stack(log_probs, dim=1), torch.stack(kls, dim=1) if with_kl else None

    @torch.no_grad()
    def kl(self, trajectory: Trajectory) -> torch.Tensor:
        """Per-step KL of the current policy to the base UNet on the trajectory's states `(B, T)`."""
        return self.log_prob(trajectory, range(self.num_actions), with_kl=True)[1]

    def save_lora(self, directory: str | Path) -> None:
        """Write `pytorch_lora_weights.safetensors`, loadable with `pipeline.load_lora_weights(directory)`."""
        save_unet_lora(LatentConsistencyModelPipeline, self.pipeline.unet, directory)

    def load_lora(self, directory: str | Path) -> None:
        """Load LoRA weights written by `save_lora` into this policy's adapter."""
        load_unet_lora(LatentConsistencyModelPipeline, self.pipeline.unet, directory)
