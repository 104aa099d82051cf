"""The tiny pretrained flow-matching model shipped in assets/tiny-flow: an SD3-style folder that loads like the real
model (in `StableDiffusion3Pipeline` and `FlowMatchPolicy`), small, and drawing its prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from rebel_diffusion import shapes
from rebel_diffusion.policies.flow_match import FlowMatchPolicy

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "tiny-flow"
PROMPTS = [p.strip() for p in (REPO / "assets" / "quickstart_prompts.txt").read_text().splitlines() if p.strip()]
T5_TOKENS = 16  # the rows of T5 zeros it was pretrained with (scripts/pretrain_tiny_flow.py)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    pipeline = StableDiffusion3Pipeline.from_pretrained(MODEL, text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_folder_is_small() -> None:
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert 0 < size <= 20 * 2**20


def test_is_an_sd3_pipeline_without_t5(pipe: StableDiffusion3Pipeline) -> None:
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert pipe.text_encoder_3 is None
    assert pipe.vae_scale_factor * pipe.transformer.config.sample_size == shapes.IMAGE_SIZE
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4


def test_pipeline_draws_the_quickstart_prompts(pipe: StableDiffusion3Pipeline) -> None:
    images = pipe(PROMPTS, num_inference_steps=8, guidance_scale=1.0, max_sequence_length=T5_TOKENS,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (len(PROMPTS), 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    truth = [shapes.parse_caption(p) for p in PROMPTS]
    colour = np.mean([shapes.dominant_colour(img) == c for img, (c, _, _) in zip(images, truth)])
    assert colour >= 0.5, f"prompted colour in {colour:.0%} of samples"  # chance is 1/6


def test_policy_loads_and_samples_with_flow_sde() -> None:
    policy = FlowMatchPolicy.from_pretrained(str(MODEL), num_steps=8, guidance_scale=1.0, resolution=shapes.IMAGE_SIZE,
                                             sde="flow_sde", sde_window=(0, 4), max_sequence_length=T5_TOKENS)
    trajectory = policy.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(0))
    assert trajectory.outputs.shape == (2, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert trajectory.log_probs.shape == (2, 4) and torch.isfinite(trajectory.log_probs).all()
