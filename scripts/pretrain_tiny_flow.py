"""Pretrain the tiny text-to-image flow-matching model shipped in `assets/tiny-flow`.

The toolkit's flow-matching targets are SD3/SD3.5 (`StableDiffusion3Pipeline`); this script builds a model small
enough to fine-tune on a laptop CPU that loads through the same `StableDiffusion3Pipeline.from_pretrained(path)` and
`FlowMatchPolicy.from_pretrained(path)` code paths. It learns the 32x32 shape captions of `rebel_diffusion.shapes`
("a {colour} {shape} on a {background} background"), as the tiny LCM of `scripts/pretrain_tiny_lcm.py` does.

Stages (all seeded):

1. Data: the same procedurally rendered images and captions as the tiny LCM's (same generator, same seed).
2. VAE: none is trained. The tiny LCM's autoencoder (`assets/tiny-lcm/vae`, 32x32x3 <-> 8x8x4) is copied with
   `shift_factor` set to 0 (the SD3 pipeline unscales latents as `latents / scaling_factor + shift_factor` and needs a
   number there); `SD3Transformer2DModel` takes 4 input channels, so this saves the LCM script's VAE stage.
3. Transformer and text encoders, trained jointly with the rectified-flow loss: `x_sigma = (1 - sigma) x0 + sigma
   noise`, target velocity `noise - x0`, the transformer fed `timestep = 1000 sigma` as the pipeline feeds it. sigma is
   drawn as the SD3 scheduler's shifted sigmas are spaced: u uniform on (0, 1), `sigma = s u / (1 + (s - 1) u)` with
   the scheduler's shift s = 3, the continuous version of the grid that `FlowMatchEulerDiscreteScheduler(shift=3)`
   samples on, so training spends its steps where few-step sampling does (mostly at high noise). Logit-normal sampling
   (SD3's paper), centred on sigma = 0.5, was not tried.
   Two `CLIPTextModelWithProjection` (width 16 each: the SD3 pipeline concatenates their penultimate hidden states
   and their pooled projections) share the real CLIP tokenizer; a caption is replaced by "" 10% of the time so that
   the pipeline's classifier-free guidance (its negative prompt is "") has an unconditional velocity to push from.
   There is no T5: the pipeline then feeds `max_sequence_length` rows of zeros in its place, and the model is
   trained with `T5_TOKENS` of them, the length it must be sampled with (`max_sequence_length=16`; the toolkit's
   `model.max_sequence_length`). Every other length changes how much attention those rows take.
4. Save the pipeline folder (safetensors; each tokenizer as the tokenizer.json transformers writes), reload it through
   `StableDiffusion3Pipeline.from_pretrained`, write a grid of 8-step ODE samples (rows: colours; columns: shapes on
   white, black, gray) and print how often the shapes heuristics read back the prompted colour and shape.

The shipped model (4,000 steps of 64, seed 0) took 15 minutes with `--threads 1` on a 2-core machine shared with other
jobs (2 rendering and encoding the data, 13 training) and is 17.9 MB. Its 8-step ODE samples show the prompted colour in
99-100% of samples at guidance 1 and 3; the prompted shape in 34% at guidance 1 (the shapes come out as rounded blobs)
and 62% at guidance 3 (chance: 25%), over all 72 captions x 2 seeds and the 12 quickstart prompts x 4 seeds alike.
A rerun (11 minutes on a less busy machine) wrote byte-identical weights.

Run from the repo root:  .venv/bin/python scripts/pretrain_tiny_flow.py --threads 1
Only re-score the saved model:  .venv/bin/python scripts/pretrain_tiny_flow.py --evaluate-only
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_tiny_lcm import (QUICKSTART, REPO, accuracy, encode_latents, folder_mb,  # noqa: E402
                               log, lr_at, pretraining_parser, save_grid, seeded_dataset,
                               text_encoder_config)

from rebel_diffusion import shapes  # noqa: E402

LCM_VAE = REPO / "assets" / "tiny-lcm" / "vae"
LCM_TOKENIZER = REPO / "assets" / "tiny-lcm" / "tokenizer"
SHIFT = 3.0
T5_TOKENS = 16
INFERENCE_STEPS = 8
GUIDANCE_SCALES = (1.0, 3.0)
CAPTION_DROPOUT = 0.1
# Each encoder's 49408-row embedding table is most of the asset: at width 16, 3.1 MB apiece; the two tokenizer copies
# (3.5 MB each), the transformer and the VAE take the rest of the 20 MB.
TEXT_WIDTH = 16


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler: Euler on the flow ODE over sigmas shifted by 3 (no dynamic shifting)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def make_text_encoder(hidden: int) -> CLIPTextModelWithProjection:
    """The tiny LCM's CLIP text transformer with its pooled projection; the vocabulary table is most of its size."""
    return CLIPTextModelWithProjection(text_encoder_config(hidden))


def make_transformer(text_dim: int, layers: int, patch_size: int) -> SD3Transformer2DModel:
    """An SD3 MMDiT on 8x8x4 latents: joint attention of image patches with the prompt tokens, the pooled prompt in the
    adaptive-norm conditioning. `text_dim` is the width of the concatenated CLIP states (= pooled width)."""
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=text_dim,
        caption_projection_dim=64,
        pooled_projection_dim=text_dim,
        pos_embed_max_size=8 // patch_size,
    )


def load_vae() -> AutoencoderKL:
    """The tiny LCM's trained autoencoder, with the shift factor the SD3 pipeline adds when it unscales."""
    vae = AutoencoderKL.from_pretrained(LCM_VAE)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def train(
    pipe: StableDiffusion3Pipeline,
    latents: torch.Tensor,
    captions: list[str],
    steps: int,
    batch: int,
    lr: float,
    rng: np.random.Generator,
    start: float,
) -> None:
    """Train the pipeline's transformer and both text encoders on the rectified-flow loss, in place."""
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, 100)
        idx = rng.integers(0, len(latents), batch)
        x0 = latents[torch.from_numpy(idx)]
        prompts = ["" if rng.random() < CAPTION_DROPOUT else captions[i] for i in idx]
        u = torch.from_numpy(rng.random(batch).astype(np.float32))
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        # The pipeline's own prompt encoding (penultimate CLIP states, pooled projections, T5 zeros), with grad.
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS, device=torch.device("cpu"),
        )
        pred = pipe.transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}/{steps} loss {loss.item():.4f}", start)
    for m in modules:
        m.eval().requires_grad_(False)


@torch.no_grad()
def sample(pipe: StableDiffusion3Pipeline, prompts: list[str], seed: int, guidance_scale: float) -> torch.Tensor:
    """8-step ODE samples (N, 3, 32, 32) in [0, 1], one per prompt, with the T5 length the model was trained on."""
    return pipe(
        prompts,
        num_inference_steps=INFERENCE_STEPS,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=T5_TOKENS,
        output_type="pt",
    ).images


def evaluate(model_dir: Path, grid_path: Path, seed: int, start: float) -> None:
    """Load the saved pipeline as users do, write the sample grid (guidance 1, i.e. none), and print the colour and
    shape accuracy of 8-step samples for the quickstart prompts and for every caption at each guidance scale."""
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    columns = [(s, b) for b in shapes.BACKGROUNDS for s in kinds]
    grid_prompts = [shapes.caption(c, s, b) for c in colours for s, b in columns]
    save_grid(sample(pipe, grid_prompts, seed, 1.0), colours, [f"{s[:5]}/{b[:3]}" for s, b in columns], grid_path)
    log(f"wrote {grid_path}", start)
    quickstart = [line for line in QUICKSTART.read_text().splitlines() if line.strip()]
    every = shapes.all_captions()
    for scale in GUIDANCE_SCALES:
        images = torch.cat([sample(pipe, quickstart, seed + k, scale) for k in range(4)])
        colour_acc, shape_acc = accuracy(images, quickstart * 4)
        log(f"quickstart prompts, guidance {scale}: colour {colour_acc:.3f} shape {shape_acc:.3f} "
            f"over {len(images)}", start)
        images = torch.cat([sample(pipe, every, seed + k, scale) for k in range(2)])
        colour_acc, shape_acc = accuracy(images, every * 2)
        log(f"all captions, guidance {scale}: colour {colour_acc:.3f} shape {shape_acc:.3f} over {len(images)}", start)


def main() -> None:
    parser = pretraining_parser(
        __doc__.splitlines()[0], REPO / "assets" / "tiny-flow", REPO / "docs" / "tiny_flow_samples.png"
    )
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=2, help="2: 16 image tokens; 1 (64) was 3-4x slower")
    args = parser.parse_args()

    start = time.time()
    # The pipeline warns on every call that CLIP truncated the EOS padding of its own length check.
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        evaluate(args.out, args.samples, args.seed, start)
        return
    rng, images, captions = seeded_dataset(args.seed, args.dataset_size)
    vae = load_vae()
    latents = encode_latents(vae, images) * vae.config.scaling_factor
    log(f"rendered and encoded {len(images)} images (latent std {latents.std().item():.3f})", start)

    tokenizer = CLIPTokenizer.from_pretrained(LCM_TOKENIZER)
    text_encoder, text_encoder_2 = make_text_encoder(TEXT_WIDTH), make_text_encoder(TEXT_WIDTH)
    pipe = StableDiffusion3Pipeline(
        transformer=make_transformer(2 * TEXT_WIDTH, args.layers, args.patch_size), scheduler=make_scheduler(),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    train(pipe, latents, captions, args.steps, args.batch, args.lr, rng, start)

    pipe.save_pretrained(args.out, safe_serialization=True)
    log(f"saved {args.out} ({folder_mb(args.out):.1f} MB)", start)

    evaluate(args.out, args.samples, args.seed, start)


if __name__ == "__main__":
    main()
