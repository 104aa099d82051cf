"""Pretrain the tiny text-to-image latent consistency model shipped in `assets/tiny-lcm`.

The toolkit's real target is `SimianLuo/LCM_Dreamshaper_v7`; this script builds a model small enough to fine-tune on a
laptop CPU that loads through the very same `LatentConsistencyModelPipeline.from_pretrained(path)` code path. It draws
32x32 images of "a {colour} {shape} on a {background} background" (see `rebel_diffusion.shapes`).

Stages (all seeded). The shipped model took 27 minutes with `--threads 1` on a 2-core machine shared with other jobs
(6 for the VAE, 19 for the denoiser); with the cores to itself, the default of 2 threads is quicker, but when other
processes compete for the cores, one thread avoids the slowdown oversubscription causes.

1. Data: a fixed set of procedurally rendered images with their captions.
2. VAE: a three-block `AutoencoderKL` (32x32x3 -> 8x8x4, so the pipeline's `vae_scale_factor` is 4) trained on
   foreground-weighted reconstruction with a tiny KL term; `scaling_factor` is set to 1 / std of the dataset latents.
3. Denoiser: a tiny `UNet2DConditionModel` (cross-attention plus a pooled-prompt term in the timestep embedding) and
   a tiny `CLIPTextModel` (fed by the real CLIP tokenizer) trained jointly with the epsilon-prediction loss under the
   LCMScheduler's noise schedule. Rather than distilling a consistency model
   from a separately trained diffusion teacher, the model is trained directly for the LCM multistep sampler: every
   LCM step turns the epsilon prediction into an x0 estimate and re-noises it to the next timestep, and those
   timesteps always come from the scheduler's `original_inference_steps` grid (19, 39, ..., 999). So training
   timesteps are drawn only from that grid, half of the time from the eight used by 8-step sampling; for this simple
   data the x0 estimates are sharp enough that the multistep sampler draws clean shapes.
4. Guidance: the pipeline never doubles the batch for classifier-free guidance; it feeds w = guidance_scale - 1
   through `get_guidance_scale_embedding` into `timestep_cond`. The UNet has `time_cond_proj_dim` set, and during
   training w is drawn uniformly from [0, 15] (guidance scales 1 to 16) while the target stays the plain conditional
   epsilon. The model therefore learns to draw what the prompt asks at any guidance scale in that range, including
   the toolkit's 8.0, and the w-embedding path exists (as in the real model) for fine-tuning to use. The guidance
   scale has no measurable effect on the shipped model (colour and shape accuracy are flat from 1.0 to 12.0).
5. Save the pipeline folder (safetensors; no safety checker or feature extractor), reload it through
   `LatentConsistencyModelPipeline.from_pretrained`, write a grid of 8-step samples at guidance 8.0 (rows: colours;
   columns: shapes on white, black, gray) and print how often the shapes heuristics read back the prompted colour
   and shape.

Run from the repo root:  .venv/bin/python scripts/pretrain_tiny_lcm.py  (the shipped model: add `--threads 1`)
Only re-score the saved model:  .venv/bin/python scripts/pretrain_tiny_lcm.py --evaluate-only
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rebel_diffusion import shapes
from rebel_diffusion.tokenizer import write_clip_tokenizer_files

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "assets" / "quickstart_prompts.txt"
MAX_TOKENS = 16  # the longest caption is 10 tokens with BOS/EOS; a short context keeps cross-attention cheap
INFERENCE_STEPS = 8
GUIDANCE_SCALE = 8.0
W_MAX = 15.0
TIME_COND_DIM = 64


def log(message: str, start: float) -> None:
    """Print a message prefixed by the minutes elapsed since `start`."""
    print(f"[{(time.time() - start) / 60:5.1f} min] {message}", flush=True)


def make_scheduler() -> LCMScheduler:
    """The LCMScheduler configuration of LCM_Dreamshaper_v7 (Stable Diffusion's scaled-linear betas)."""
    return LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=50,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=True,
        clip_sample=False,
        prediction_type="epsilon",
        timestep_scaling=10.0,
    )


def make_vae() -> AutoencoderKL:
    """Three down blocks (two downsamplings): 32x32x3 images <-> 8x8x4 latents.

    One normalisation group per layer: with several small groups, GroupNorm strips each group's mean and the
    autoencoder took far longer to carry the absolute colour of a flat shape through.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=shapes.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def text_encoder_config(hidden: int) -> CLIPTextConfig:
    """A two-layer CLIP text transformer over the full CLIP vocabulary (the real tokenizer's ids reach 49407); a
    projection, where one is used, keeps the width."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def make_text_encoder(hidden: int) -> CLIPTextModel:
    """The CLIP text transformer of `text_encoder_config`."""
    return CLIPTextModel(text_encoder_config(hidden))


def make_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """A two-level cross-attention UNet on 8x8x4 latents with the LCM guidance-embedding input.

    Besides cross-attention, an attention-pooled summary of the prompt is added to the timestep embedding
    (`addition_embed_type="text"`), so every ResNet block sees which shape was asked for. With cross-attention alone
    (and 1,800 steps) samples had the right colour almost always but the right shape only about half the time; with
    this term and 2,400 steps, about three quarters of the time.
    """
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        time_cond_proj_dim=TIME_COND_DIM,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW tensor in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(images: np.ndarray, steps: int, batch: int, rng: np.random.Generator, start: float) -> AutoencoderKL:
    """Fit the autoencoder on reconstruction of the posterior mean (MSE + L1), with foreground pixels weighted 4x
    so that the shape's colour is learned early rather than after the background, plus a tiny KL term."""
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    data = to_model_range(images)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3, 30)
        x = data[torch.from_numpy(rng.integers(0, len(data), batch))]
        # The corner pixel is background (shapes keep a one-pixel margin).
        foreground = ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.2).float()
        posterior = vae.encode(x).latent_dist
        error = vae.decode(posterior.mean).sample - x
        loss = ((1 + 3 * foreground) * (error**2 + 0.5 * error.abs())).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}", start)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    """Posterior means of all images, unscaled."""
    data = to_model_range(images)
    return torch.cat([vae.encode(data[i : i + 512]).latent_dist.mean for i in range(0, len(data), 512)])


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of 1000 * w that `LatentConsistencyModelPipeline.get_guidance_scale_embedding` uses."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def train_denoiser(
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    scheduler: LCMScheduler,
    steps: int,
    batch: int,
    hidden: int,
    rng: np.random.Generator,
    start: float,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train the UNet and the text encoder together on epsilon prediction at the LCM grid's timesteps."""
    unet, text_encoder = make_unet(hidden), make_text_encoder(hidden)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    alphas = scheduler.alphas_cumprod
    grid = torch.arange(1, 51) * 20 - 1  # the 50-step LCM origin grid: 19, 39, ..., 999
    scheduler.set_timesteps(INFERENCE_STEPS)
    sampling_steps = scheduler.timesteps.clone()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3, 100)
        idx = torch.from_numpy(rng.integers(0, len(latents), batch))
        x0 = latents[idx]
        on_grid = torch.from_numpy(rng.random(batch) < 0.5)
        t = torch.where(
            on_grid,
            sampling_steps[torch.from_numpy(rng.integers(0, len(sampling_steps), batch))],
            grid[torch.from_numpy(rng.integers(0, len(grid), batch))],
        )
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        w = torch.from_numpy(rng.uniform(0.0, W_MAX, batch).astype(np.float32))
        text = text_encoder(token_ids[idx])[0]
        pred = unet(xt, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(w, TIME_COND_DIM)).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}", start)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def sample(
    pipe: LatentConsistencyModelPipeline, prompts: list[str], seed: int, guidance_scale: float = GUIDANCE_SCALE
) -> torch.Tensor:
    """8-step samples (N, 3, 32, 32) in [0, 1], one per prompt."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompts,
        num_inference_steps=INFERENCE_STEPS,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="pt",
    ).images


def accuracy(images: torch.Tensor, prompts: list[str]) -> tuple[float, float]:
    """Fractions of images whose dominant colour, and whose shape, match the prompt per the shapes heuristics."""
    truth = [shapes.parse_caption(p) for p in prompts]
    colours = np.mean([shapes.dominant_colour(img) == c for img, (c, _, _) in zip(images, truth)])
    kinds = np.mean([shapes.classify_shape(img) == s for img, (_, s, _) in zip(images, truth)])
    return float(colours), float(kinds)


def save_grid(images: torch.Tensor, rows: list[str], cols: list[str], path: Path, scale: int = 4) -> None:
    """Tile row-major images into a labelled grid, upscaled with nearest neighbour so the pixels stay visible."""
    size = images.shape[-1] * scale
    pad, label_w, label_h = 2, 56, 14
    grid = Image.new("RGB", (label_w + len(cols) * (size + pad), label_h + len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(cols):
        draw.text((label_w + j * (size + pad) + 2, 1), name, fill="black")
    for i, name in enumerate(rows):
        draw.text((2, label_h + i * (size + pad) + size // 2 - 5), name, fill="black")
        for j in range(len(cols)):
            array = (images[i * len(cols) + j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_w + j * (size + pad), label_h + i * (size + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def evaluate(model_dir: Path, grid_path: Path, seed: int, start: float) -> None:
    """Load the saved pipeline as users do, write the sample grid, and print the colour and shape accuracy of 8-step
    samples: for the quickstart prompts at guidance 8.0, and for every caption at several guidance scales."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    columns = [(s, b) for b in shapes.BACKGROUNDS for s in kinds]
    grid_prompts = [shapes.caption(c, s, b) for c in colours for s, b in columns]
    save_grid(sample(pipe, grid_prompts, seed=seed), colours, [f"{s[:5]}/{b[:3]}" for s, b in columns], grid_path)
    log(f"wrote {grid_path}", start)

    quickstart = [line for line in QUICKSTART.read_text().splitlines() if line.strip()]
    images = torch.cat([sample(pipe, quickstart, seed=seed + k) for k in range(4)])
    colour_acc, shape_acc = accuracy(images, quickstart * 4)
    log(f"quickstart prompts: colour {colour_acc:.3f} shape {shape_acc:.3f} over {len(images)} samples", start)
    every = shapes.all_captions()
    for scale in (1.0, 4.0, GUIDANCE_SCALE, 12.0):
        images = torch.cat([sample(pipe, every, seed=seed + k, guidance_scale=scale) for k in range(4)])
        colour_acc, shape_acc = accuracy(images, every * 4)
        log(f"all captions, guidance {scale}: colour {colour_acc:.3f} shape {shape_acc:.3f} over {len(images)}", start)


def pretraining_parser(description: str, out: Path, samples: Path) -> argparse.ArgumentParser:
    """The options every tiny-model pretraining script takes: where to save, the sample grid, seed, data, threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--samples", type=Path, default=samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-size", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--evaluate-only", action="store_true", help="only sample and score the saved model")
    return parser


def seeded_dataset(seed: int, size: int) -> tuple[np.random.Generator, np.ndarray, list[str]]:
    """Seed torch, and render `size` images with their captions from a generator seeded alike (returned for the
    training stages to draw from): the same seed gives every pretraining script the same data."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images, captions, _ = shapes.generate_dataset(size, rng)
    return rng, images, captions


def folder_mb(path: Path) -> float:
    """The size of a folder's files in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = pretraining_parser(
        __doc__.splitlines()[0], REPO / "assets" / "tiny-lcm", REPO / "docs" / "tiny_lcm_samples.png"
    )
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-steps", type=int, default=2400)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32, help="text encoder width = UNet cross-attention dim")
    args = parser.parse_args()

    start = time.time()
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        evaluate(args.out, args.samples, args.seed, start)
        return
    rng, images, captions = seeded_dataset(args.seed, args.dataset_size)
    log(f"rendered {len(images)} images", start)

    vae = train_vae(images, args.vae_steps, args.vae_batch, rng, start)
    raw_latents = encode_latents(vae, images)
    scaling = 1.0 / raw_latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    latents = raw_latents * scaling
    with torch.no_grad():
        recon = (vae.decode(raw_latents[:256]).sample / 2 + 0.5).clamp(0, 1)
    recon_colour, recon_shape = accuracy(recon, captions[:256])
    log(f"vae scaling_factor {scaling:.4f}; reconstructions: colour {recon_colour:.3f} shape {recon_shape:.3f}", start)

    tokenizer_dir = args.out / "tokenizer"
    write_clip_tokenizer_files(tokenizer_dir, model_max_length=MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # Tokenised exactly as the pipeline's encode_prompt does: padded to the maximum length with EOS, no attention mask.
    token_ids = tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids

    scheduler = make_scheduler()
    unet, text_encoder = train_denoiser(
        latents, token_ids, scheduler, args.unet_steps, args.unet_batch, args.hidden, rng, start
    )

    pipe = LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    log(f"saved {args.out} ({folder_mb(args.out):.1f} MB)", start)

    evaluate(args.out, args.samples, args.seed, start)


if __name__ == "__main__":
    main()
