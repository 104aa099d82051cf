"""Rewards for the shipped tiny LCM (`assets/tiny-lcm`): how well an image shows its "a {colour} {shape} on a
{background} background" prompt, read back with the pixel heuristics of `rebel_diffusion.shapes`.

* `shape_fidelity`, the training reward, in [0, 1]:

      0.5 * colour_term + 0.5 * shape_term
      colour_term = fraction of the foreground pixels' colour votes that go to the prompted colour
      shape_term  = IoU(prompted) * softmax(IoU / SHAPE_TEMPERATURE)[prompted] * min(1, blob extent / MIN_SIZE)

  where IoU is that of the largest foreground blob with each shape's template. The IoU rewards a clean drawing of the
  prompted shape; the softmax over the four shapes makes it count only when the prompted shape beats the others
  (small shapes on a 32 px grid score IoU ~0.8 against the wrong template, so IoU alone cannot tell them apart); the
  extent factor stops a few-pixel speck, which every template matches, from passing as any shape. An image without
  foreground scores 0.
* `shape_accuracy`, the evaluation metric: 1 when `classify_shape` and `dominant_colour` give the prompted shape and
  colour, else 0.
* `large_shape`, the quickstart's reward, a composition target on top of prompt fidelity, in [0, 1]:

      shape_fidelity * min(1, blob extent / LARGE_EXTENT)

  The training images drew shapes 14 to 24 px wide and the tiny model draws them 17 to 25 px wide (median 21) at
  32 px, so asking for LARGE_EXTENT px is inside what it can draw, and a person sees the shapes grow. The factor stops
  at LARGE_EXTENT, so nothing pays for pushing a shape into the border; the fidelity factor keeps the prompted colour
  and shape (a big blob of the wrong shape or colour scores low, a flat image 0).

The background named in the prompt is not scored: the heuristics take the border as background, whatever its colour.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from rebel_diffusion import shapes
from rebel_diffusion.rewards import RewardFn, register_reward

# Sets which IoU differences between shapes count as decisive. Ground-truth renders beat the best wrong template by a
# median 0.21 in IoU (>= 0.1 in 99.8% of them), which this temperature turns into a softmax weight of 0.99 (>= 0.85);
# a tie gives at most 0.5. A lower temperature sharpens the reward towards 0/1 and starves RL of signal.
SHAPE_TEMPERATURE = 0.05
# The extent (px at IMAGE_SIZE) from which `large_shape` pays fully: two pixels above the largest training shape.
LARGE_EXTENT = 26


def _parse_prompts(prompts: list[str], count: int, reward: str) -> list[tuple[str, str, str]]:
    """(colour, shape, background) of each prompt; ValueError naming the first prompt that is not a shapes caption."""
    if len(prompts) != count:
        raise ValueError(f"{reward} reward: got {count} images but {len(prompts)} prompts")
    parsed = []
    for prompt in prompts:
        try:
            parsed.append(shapes.parse_caption(prompt))
        except ValueError:
            raise ValueError(
                f"{reward} reward: prompt {prompt!r} is not a shapes caption "
                "'a {colour} {shape} on a {background} background'"
            ) from None
    return parsed


def _as_hwc_arrays(images: torch.Tensor) -> np.ndarray:
    """`(B, 3, H, W)` images in [0, 1] on any device -> one `(B, H, W, 3)` float32 numpy array on the CPU."""
    return images.detach().to(dtype=torch.float32).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def fidelity(image: np.ndarray, colour: str, shape: str) -> float:
    """The `shape_fidelity` score in [0, 1] of one `(H, W, 3)` float image in [0, 1] for a prompted colour and shape."""
    votes = shapes.colour_votes(image)
    total_votes = sum(votes.values())
    if total_votes == 0:
        return 0.0
    colour_term = votes[colour] / total_votes

    blob = shapes.largest_blob(shapes.foreground_mask(image))
    ious = shapes.blob_shape_scores(blob)
    logits = np.array([ious[name] for name in shapes.SHAPES]) / SHAPE_TEMPERATURE
    weights = np.exp(logits - logits.max())
    shape_weight = weights[shapes.SHAPES.index(shape)] / weights.sum()
    # Training shapes are at least MIN_SIZE pixels wide at IMAGE_SIZE; scale that to this image's resolution.
    min_extent = shapes.MIN_SIZE * min(image.shape[:2]) / shapes.IMAGE_SIZE
    shape_term = ious[shape] * shape_weight * min(1.0, blob_extent(blob) / min_extent)
    return float(0.5 * colour_term + 0.5 * shape_term)


def blob_extent(blob: np.ndarray) -> int:
    """The larger side of a non-empty blob's bounding box, in pixels."""
    rows, cols = np.nonzero(blob)
    return int(max(np.ptp(rows), np.ptp(cols)) + 1)


def large(image: np.ndarray, colour: str, shape: str) -> float:
    """The `large_shape` score in [0, 1] of one `(H, W, 3)` float image in [0, 1]: `fidelity` times the largest blob's
    extent over LARGE_EXTENT (scaled to the image's resolution), capped at 1."""
    score = fidelity(image, colour, shape)
    if score == 0.0:
        return 0.0
    full = LARGE_EXTENT * min(image.shape[:2]) / shapes.IMAGE_SIZE
    return score * min(1.0, blob_extent(shapes.largest_blob(shapes.foreground_mask(image))) / full)


def accuracy(image: np.ndarray, colour: str, shape: str) -> float:
    """1.0 if one `(H, W, 3)` float image shows the prompted colour and shape, as `dominant_colour` and
    `classify_shape` read it, else 0.0."""
    return float(shapes.classify_shape(image) == shape and shapes.dominant_colour(image) == colour)


def _per_image(score: Callable[[np.ndarray, str, str], float], name: str) -> RewardFn:
    """A reward that applies `score(image, colour, shape)` to each image and its parsed prompt."""

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parsed = _parse_prompts(prompts, len(images), name)
        arrays = _as_hwc_arrays(images)
        return torch.tensor([score(image, colour, shape) for image, (colour, shape, _) in zip(arrays, parsed)],
                            dtype=torch.float32)

    return reward_fn


@register_reward("shape_fidelity", kind="image")
def shape_fidelity(device=None, dtype=None) -> RewardFn:
    """How well each image shows its prompt's colour and shape, in [0, 1]; smooth, for training."""
    return _per_image(fidelity, "shape_fidelity")


@register_reward("large_shape", kind="image")
def large_shape(device=None, dtype=None) -> RewardFn:
    """The prompted colour and shape, drawn large: `shape_fidelity` times the extent factor, in [0, 1]."""
    return _per_image(large, "large_shape")


@register_reward("shape_accuracy", kind="image")
def shape_accuracy(device=None, dtype=None) -> RewardFn:
    """1 where the image draws the prompted shape in the prompted colour, else 0; the held-out evaluation metric."""
    return _per_image(accuracy, "shape_accuracy")
