"""The procedural shapes dataset and the pixel heuristics that read colour and shape back from an image."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from rebel_diffusion import shapes


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, list[str], list[shapes.ShapeSpec]]:
    return shapes.generate_dataset(600, np.random.default_rng(123))


def test_caption_round_trip() -> None:
    for colour, shape, background in itertools.product(shapes.COLOURS, shapes.SHAPES, shapes.BACKGROUNDS):
        text = shapes.caption(colour, shape, background)
        assert shapes.parse_caption(text) == (colour, shape, background)
    assert shapes.caption("red", "circle", "white") == "a red circle on a white background"


@pytest.mark.parametrize(
    "text", ["a pink circle on a white background", "a red circle", "a red blob on a gray background"]
)
def test_parse_caption_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError):
        shapes.parse_caption(text)


def test_vocabulary_size_and_all_captions() -> None:
    assert len(shapes.COLOURS) >= 6 and len(shapes.SHAPES) == 4 and len(shapes.BACKGROUNDS) >= 3
    everything = shapes.all_captions()
    assert len(set(everything)) == len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.BACKGROUNDS)
    assert all(text.endswith("on a white background") for text in shapes.all_captions(("white",)))


def test_palette_is_well_separated() -> None:
    colours = np.array(list(shapes.COLOURS.values()), dtype=float)
    backgrounds = np.array(list(shapes.BACKGROUNDS.values()), dtype=float)
    between_colours = np.linalg.norm(colours[:, None] - colours[None], axis=-1)[np.triu_indices(len(colours), 1)]
    assert between_colours.min() >= 120
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=-1).min() >= 120


def test_generation_is_deterministic_given_the_generator() -> None:
    a, captions_a, _ = shapes.generate_dataset(20, np.random.default_rng(7))
    b, captions_b, _ = shapes.generate_dataset(20, np.random.default_rng(7))
    c, _, _ = shapes.generate_dataset(20, np.random.default_rng(8))
    assert np.array_equal(a, b) and captions_a == captions_b
    assert not np.array_equal(a, c)


def test_images_match_their_specs(dataset: tuple[np.ndarray, list[str], list[shapes.ShapeSpec]]) -> None:
    images, captions, specs = dataset
    assert images.shape == (600, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert captions == [spec.caption for spec in specs]
    for attr, names in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES), ("background", shapes.BACKGROUNDS)):
        assert {getattr(spec, attr) for spec in specs} == set(names)
    sizes = [spec.size for spec in specs]
    assert min(sizes) >= shapes.MIN_SIZE and max(sizes) <= shapes.MAX_SIZE and len(set(sizes)) > 5
    for image, spec in zip(images, specs):
        # The one-pixel border is pure background, and the shape's own colour is present at full strength.
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == shapes.BACKGROUNDS[spec.background]).all()
        assert (image == shapes.COLOURS[spec.colour]).all(axis=-1).any()


def test_heuristics_recover_ground_truth(dataset: tuple[np.ndarray, list[str], list[shapes.ShapeSpec]]) -> None:
    images, _, specs = dataset
    colour_hits = np.mean([shapes.dominant_colour(img) == spec.colour for img, spec in zip(images, specs)])
    shape_hits = np.mean([shapes.classify_shape(img) == spec.shape for img, spec in zip(images, specs)])
    background_hits = np.mean([shapes.background_name(img) == spec.background for img, spec in zip(images, specs)])
    assert colour_hits == 1.0
    assert shape_hits >= 0.99
    assert background_hits == 1.0


def test_heuristics_tolerate_blur_and_noise(dataset: tuple[np.ndarray, list[str], list[shapes.ShapeSpec]]) -> None:
    """Model samples are softer and noisier than the renders; the heuristics must still read them."""
    images, _, specs = dataset
    rng = np.random.default_rng(0)
    degraded = ndimage.gaussian_filter(images[:200].astype(np.float32) / 255, sigma=(0, 0.7, 0.7, 0))
    degraded = np.clip(degraded + rng.normal(0, 0.05, degraded.shape), 0, 1)
    colour_hits = np.mean([shapes.dominant_colour(img) == spec.colour for img, spec in zip(degraded, specs)])
    shape_hits = np.mean([shapes.classify_shape(img) == spec.shape for img, spec in zip(degraded, specs)])
    assert colour_hits >= 0.98
    assert shape_hits >= 0.9


def test_wrong_images_are_not_credited() -> None:
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert shapes.dominant_colour(blank) is None and shapes.classify_shape(blank) is None
    spec = shapes.ShapeSpec("blue", "square", "black", cx=16.0, cy=16.0, size=20)
    image = shapes.render(spec)
    assert shapes.dominant_colour(image) == "blue" and shapes.classify_shape(image) == "square"
    scores = shapes.shape_scores(image)
    assert scores["square"] > 0.95 and max(v for k, v in scores.items() if k != "square") < 0.85


def test_accepts_pipeline_tensors(dataset: tuple[np.ndarray, list[str], list[shapes.ShapeSpec]]) -> None:
    images, _, specs = dataset
    chw = torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255
    assert np.allclose(shapes.as_float_image(chw), shapes.as_float_image(images[0]))
    assert shapes.dominant_colour(chw) == specs[0].colour
    with pytest.raises(ValueError):
        shapes.as_float_image(np.zeros((32, 32)))
