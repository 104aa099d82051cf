"""The `shape_fidelity` reward and `shape_accuracy` metric: on ground-truth renders, on hand-made edge cases and on the
shipped tiny LCM's samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rebel_diffusion import shapes
from rebel_diffusion.rewards import available_rewards, make_reward_fn, reward_kind
from rebel_diffusion.rewards.shape_fidelity import SHAPE_TEMPERATURE

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "assets" / "tiny-lcm"
QUICKSTART = REPO / "assets" / "quickstart_prompts.txt"
HELDOUT = REPO / "assets" / "shape_heldout_prompts.txt"


def read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def as_batch(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1], what a policy hands the reward."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def renders() -> tuple[torch.Tensor, list[shapes.ShapeSpec]]:
    images, _, specs = shapes.generate_dataset(200, np.random.default_rng(0))
    return as_batch(images), specs


@pytest.fixture(scope="module")
def fidelity():
    return make_reward_fn("shape_fidelity")


@pytest.fixture(scope="module")
def accuracy():
    return make_reward_fn("shape_accuracy")


def with_shape(spec: shapes.ShapeSpec, shape: str) -> str:
    return shapes.caption(spec.colour, shape, spec.background)


def test_both_are_registered_image_rewards():
    assert {"shape_fidelity", "shape_accuracy"} <= set(available_rewards())
    assert reward_kind("shape_fidelity") == reward_kind("shape_accuracy") == "image"


def test_blob_shape_scores_match_shape_scores(renders):
    images, _ = renders
    for image in images[:50]:
        blob = shapes.largest_blob(shapes.foreground_mask(image))
        assert shapes.blob_shape_scores(blob) == shapes.shape_scores(image)


def test_score_is_the_documented_formula():
    # A pixel-aligned 20 px red square: its blob is exactly the square, every vote is red.
    spec = shapes.ShapeSpec("red", "square", "white", cx=16.0, cy=16.0, size=20)
    image = shapes.render(spec)
    ious = shapes.shape_scores(image)
    assert ious["square"] == 1.0
    weights = {name: np.exp(iou / SHAPE_TEMPERATURE) for name, iou in ious.items()}
    expected = 0.5 * 1.0 + 0.5 * ious["square"] * weights["square"] / sum(weights.values())
    score = make_reward_fn("shape_fidelity")(as_batch(image[None]), [spec.caption])
    assert score.item() == pytest.approx(expected, abs=1e-6)
    assert score.item() > 0.98


def test_renders_score_high_for_their_own_caption(renders, fidelity):
    images, specs = renders
    scores = fidelity(images, [spec.caption for spec in specs])
    # A rare render (a small cross whose anti-aliased arms look round) is only a little clearer than its rival shape.
    assert scores.mean() > 0.95
    assert torch.quantile(scores, 0.01) > 0.85
    assert scores.min() > 0.7


def test_wrong_shape_scores_clearly_lower(renders, fidelity):
    images, specs = renders
    own = fidelity(images, [spec.caption for spec in specs])
    for shape in shapes.SHAPES:
        wrong = [i for i, spec in enumerate(specs) if spec.shape != shape]
        scores = fidelity(images[wrong], [with_shape(specs[i], shape) for i in wrong])
        # The colour half still counts (0.5), the shape half nearly vanishes.
        assert scores.max() < 0.65
        assert (own[wrong] - scores).min() > 0.25


def test_wrong_colour_loses_the_colour_half(renders, fidelity):
    images, specs = renders
    colours = list(shapes.COLOURS)
    shifted = {colour: colours[(i + 1) % len(colours)] for i, colour in enumerate(colours)}
    wrong = [shapes.caption(shifted[s.colour], s.shape, s.background) for s in specs]
    own = fidelity(images, [spec.caption for spec in specs])
    scores = fidelity(images, wrong)
    assert scores.max() <= 0.5 + 1e-6
    torch.testing.assert_close(scores, own - 0.5, atol=1e-6, rtol=0)


@pytest.mark.parametrize("background", list(shapes.BACKGROUNDS))
def test_flat_image_scores_zero(background, fidelity, accuracy):
    rgb = torch.tensor(shapes.BACKGROUNDS[background], dtype=torch.float32) / 255
    flat = rgb.view(1, 3, 1, 1).expand(2, 3, 32, 32)
    prompts = [shapes.caption("red", "square", background), shapes.caption("cyan", "cross", background)]
    assert fidelity(flat, prompts).tolist() == [0.0, 0.0]
    assert accuracy(flat, prompts).tolist() == [0.0, 0.0]


def test_a_speck_is_not_a_square(fidelity):
    # Every template matches a 2x2 blob equally well; only the colour half and a sliver of the shape half remain.
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    image[15:17, 15:17] = shapes.COLOURS["red"]
    score = fidelity(as_batch(image[None]), ["a red square on a white background"]).item()
    assert 0.5 < score < 0.55


def test_renders_are_accurate_and_wrong_captions_are_not(renders, accuracy):
    images, specs = renders
    assert accuracy(images, [spec.caption for spec in specs]).tolist() == [1.0] * len(specs)
    other_shape = [with_shape(s, shapes.SHAPES[(shapes.SHAPES.index(s.shape) + 1) % 4]) for s in specs]
    assert accuracy(images, other_shape).sum() == 0
    other_colour = [shapes.caption("red" if s.colour != "red" else "blue", s.shape, s.background) for s in specs]
    assert accuracy(images, other_colour).sum() == 0


@pytest.mark.parametrize("name", ["shape_fidelity", "shape_accuracy"])
def test_output_is_b_float32_in_unit_interval(name):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=generator).half()
    captions = shapes.all_captions()
    prompts = [captions[i] for i in torch.randint(len(captions), (6,), generator=generator).tolist()]
    scores = make_reward_fn(name)(images, prompts)
    assert scores.shape == (6,) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("name", ["shape_fidelity", "shape_accuracy"])
def test_prompts_that_are_not_captions_are_one_line_errors(name):
    reward_fn = make_reward_fn(name)
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"prompt 'a photo of a cat' is not a shapes caption") as error:
        reward_fn(images, ["a red circle on a white background", "a photo of a cat"])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward_fn(images, ["a red circle on a white background"])


def test_heldout_prompts_are_every_caption_not_trained_on():
    heldout, quickstart = read_prompts(HELDOUT), read_prompts(QUICKSTART)
    assert not set(heldout) & set(quickstart)
    assert sorted(heldout + quickstart) == sorted(shapes.all_captions())
    assert len(heldout) == len(set(heldout))


def test_tiny_lcm_accuracy_and_fidelity_agree():
    from rebel_diffusion.policies.lcm import LCMPolicy

    # lora_init=True zero-inits LoRA's B, so the policy samples exactly the shipped base model.
    policy = LCMPolicy.from_pretrained(str(MODEL), resolution=32, lora_init=True)
    prompts = read_prompts(QUICKSTART)
    images = torch.cat([policy.sample(prompts, generator=torch.Generator().manual_seed(s)).outputs for s in range(4)])
    prompts = prompts * 4
    fidelity = make_reward_fn("shape_fidelity")(images, prompts)
    accurate = make_reward_fn("shape_accuracy")(images, prompts).bool()
    # The base model draws the prompted shape in ~77% of samples (triangles and crosses ~55%).
    assert 0.4 <= accurate.float().mean() <= 0.95
    assert fidelity[accurate].mean() > fidelity[~accurate].mean() + 0.15
    # A graded signal for RL, not a 0 / 0.5 / 1 step function.
    assert ((fidelity > 0.55) & (fidelity < 0.95)).float().mean() > 0.5


@pytest.mark.parametrize("size, factor", [(12, 12 / 26), (20, 20 / 26), (26, 1.0), (28, 1.0)])
def test_large_shape_is_fidelity_times_the_capped_extent(size, factor):
    # Pixel-aligned squares: the blob's extent is exactly `size` pixels, so the factor is size / 26 up to 1.
    spec = shapes.ShapeSpec("green", "square", "black", cx=16.0, cy=16.0, size=size)
    image = as_batch(shapes.render(spec)[None])
    fidelity = make_reward_fn("shape_fidelity")(image, [spec.caption]).item()
    assert fidelity > 0.9
    assert make_reward_fn("large_shape")(image, [spec.caption]).item() == pytest.approx(fidelity * factor, abs=1e-6)


def test_large_shape_pays_nothing_for_a_flat_image_or_a_big_wrong_shape():
    large = make_reward_fn("large_shape")
    flat = torch.zeros(1, 3, 32, 32)
    assert large(flat, ["a red circle on a black background"]).item() == 0.0
    big_square = as_batch(shapes.render(shapes.ShapeSpec("red", "square", "black", 16.0, 16.0, 26))[None])
    right = large(big_square, ["a red square on a black background"]).item()
    assert large(big_square, ["a red cross on a black background"]).item() < 0.7 * right
    assert large(big_square, ["a blue square on a black background"]).item() < 0.6 * right
