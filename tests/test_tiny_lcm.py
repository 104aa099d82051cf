"""The tiny pretrained LCM shipped in assets/tiny-lcm: loadable like the real model, small, and good at its prompts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from rebel_diffusion import shapes

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "tiny-lcm"
PROMPTS = REPO / "assets" / "quickstart_prompts.txt"
# Measured on the shipped model with these seeds: colour 100%, shape 77% (both sets); chance is 1/6 and 1/4.
MIN_COLOUR_ACCURACY = 0.8
MIN_SHAPE_ACCURACY = 0.6


@pytest.fixture(scope="module")
def pipe() -> LatentConsistencyModelPipeline:
    pipeline = LatentConsistencyModelPipeline.from_pretrained(MODEL)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def quickstart_prompts() -> list[str]:
    return [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]


def generate(pipe: LatentConsistencyModelPipeline, prompts: list[str], per_prompt: int) -> torch.Tensor:
    """8-step samples at the toolkit's guidance scale, `per_prompt` seeds each, grouped by prompt."""
    return pipe(
        prompts,
        num_images_per_prompt=per_prompt,
        num_inference_steps=8,
        guidance_scale=8.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def rates(images: torch.Tensor, prompts: list[str], per_prompt: int) -> tuple[float, float]:
    """Fractions of samples whose dominant colour, and whose shape, are the prompted ones."""
    truth = [shapes.parse_caption(p) for p in prompts for _ in range(per_prompt)]
    colour = np.mean([shapes.dominant_colour(img) == c for img, (c, _, _) in zip(images, truth)])
    shape = np.mean([shapes.classify_shape(img) == s for img, (_, s, _) in zip(images, truth)])
    return float(colour), float(shape)


def shape_confusion(images: torch.Tensor, prompts: list[str], per_prompt: int) -> dict[str, Counter]:
    """For each prompted shape, how often each shape was drawn."""
    drawn: dict[str, Counter] = {shape: Counter() for shape in shapes.SHAPES}
    truth = [shapes.parse_caption(p)[1] for p in prompts for _ in range(per_prompt)]
    for image, shape in zip(images, truth):
        drawn[shape][shapes.classify_shape(image)] += 1
    return drawn


def test_folder_is_small() -> None:
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert 0 < size < 20 * 2**20


def test_is_a_latent_consistency_model(pipe: LatentConsistencyModelPipeline) -> None:
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == shapes.IMAGE_SIZE
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # The real CLIP tokenizer: BOS, one token per word of the caption, EOS.
    ids = pipe.tokenizer("a red circle on a white background").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 9


def test_quickstart_prompts_are_training_captions() -> None:
    prompts = quickstart_prompts()
    assert 8 <= len(prompts) <= 12
    parsed = [shapes.parse_caption(p) for p in prompts]
    assert {c for c, _, _ in parsed} == set(shapes.COLOURS)
    assert {s for _, s, _ in parsed} == set(shapes.SHAPES)


def test_draws_the_quickstart_prompts(pipe: LatentConsistencyModelPipeline) -> None:
    prompts = quickstart_prompts()
    images = generate(pipe, prompts, per_prompt=4)
    assert images.shape == (4 * len(prompts), 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    colour, shape = rates(images, prompts, per_prompt=4)
    assert colour >= MIN_COLOUR_ACCURACY, f"prompted colour in {colour:.0%} of samples"
    assert shape >= MIN_SHAPE_ACCURACY, f"prompted shape in {shape:.0%} of samples"


def test_draws_every_colour_and_shape(pipe: LatentConsistencyModelPipeline) -> None:
    prompts = shapes.all_captions()
    images = generate(pipe, prompts, per_prompt=2)
    colour, shape = rates(images, prompts, per_prompt=2)
    assert colour >= MIN_COLOUR_ACCURACY, f"prompted colour in {colour:.0%} of samples"
    assert shape >= MIN_SHAPE_ACCURACY, f"prompted shape in {shape:.0%} of samples"
    # Every shape is distinguishable: asked for it, the model draws it more often than any other shape.
    for asked, drawn in shape_confusion(images, prompts, per_prompt=2).items():
        assert drawn.most_common(1)[0][0] == asked, f"asked for a {asked}, drew {dict(drawn)}"


def test_samples_depend_on_the_seed(pipe: LatentConsistencyModelPipeline) -> None:
    images = generate(pipe, ["a red circle on a white background"], per_prompt=2)
    assert not torch.allclose(images[0], images[1])
