"""Procedural "coloured shape on a plain background" images, their captions, and pixel heuristics that read them back.

The tiny pretrained LCM in `assets/tiny-lcm` is trained on these images, and its quality checks use the heuristics
here:

* `dominant_colour`: the background is the median of the border pixels; every pixel that differs from it by more than
  a threshold is explained as a blend of the background with each palette colour (the best mixing weight along the
  segment background -> colour), and votes for the colour whose blend leaves the smallest residual. The majority wins.
  Unmixing, rather than plain nearest-colour, keeps anti-aliased or blurry edges (pink = red on white) from voting for
  the wrong colour.
* `classify_shape`: the largest connected foreground blob is cropped to its bounding box and compared with each shape
  rendered into a box of the same size; the shape with the highest intersection-over-union wins. The fill ratios of
  the shapes within their box (circle 0.785, square 1.0, triangle 0.5, cross 0.51) alone cannot tell a triangle from a
  cross, the templates can.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

IMAGE_SIZE = 32

# Near corners of the RGB cube: every pair is at RGB distance >= 130, and every colour >= 125 from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 185, 45),
    "blue": (35, 65, 225),
    "yellow": (240, 220, 30),
    "purple": (165, 45, 215),
    "cyan": (30, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

MIN_SIZE = 14
MAX_SIZE = 24
# Half-width of the cross's arms relative to its half-size.
_CROSS_ARM = 0.3
# Sub-pixels per pixel side when rendering, for anti-aliased edges.
_SUPERSAMPLE = 4
# A pixel is foreground when its RGB distance (in [0, 1] units) from the background exceeds this.
_FOREGROUND_THRESHOLD = 0.25

_CAPTION_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class ShapeSpec:
    """One image: a `shape` of `colour`, `size` pixels wide, centred at (`cx`, `cy`), on `background`."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    size: int

    @property
    def caption(self) -> str:
        """The training caption, e.g. "a red circle on a white background"."""
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    """The caption for a colour, shape and background: "a {colour} {shape} on a {background} background"."""
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of `caption`: (colour, shape, background). Raises ValueError for any other text."""
    match = _CAPTION_RE.match(text.strip())
    if match is None or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in BACKGROUNDS:
        raise ValueError(f"not a shapes caption: {text!r}")
    return match[1], match[2], match[3]


def all_captions(backgrounds: tuple[str, ...] | None = None) -> list[str]:
    """Every colour x shape x background caption (optionally for some backgrounds only), in a fixed order."""
    chosen = backgrounds if backgrounds is not None else tuple(BACKGROUNDS)
    return [caption(c, s, b) for b in chosen for c in COLOURS for s in SHAPES]


def sample_spec(rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> ShapeSpec:
    """A uniformly random colour, shape and background, with a random size and a position that keeps the shape
    (and a one-pixel border of background) inside the image."""
    size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    half = size / 2
    low, high = 1 + half, image_size - 1 - half
    return ShapeSpec(
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        cx=float(rng.uniform(low, high)),
        cy=float(rng.uniform(low, high)),
        size=size,
    )


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether box coordinates (u, v) in [-1, 1] (v pointing down) fall inside `shape` drawn to fill the box."""
    in_box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return in_box
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge.
        return in_box & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":
        return in_box & ((np.abs(u) <= _CROSS_ARM) | (np.abs(v) <= _CROSS_ARM))
    raise ValueError(f"unknown shape {shape!r}")


def shape_coverage(
    shape: str, height: int, width: int, cx: float, cy: float, box_h: float, box_w: float
) -> np.ndarray:
    """Fraction of each pixel of a (height, width) image covered by `shape` filling a box_h x box_w box centred at
    (cx, cy), in pixel units where pixel (i, j) spans [j, j + 1) x [i, i + 1)."""
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    u = (xs[None, :] - cx) / (box_w / 2)
    v = (ys[:, None] - cy) / (box_h / 2)
    inside = _inside(shape, u, v).astype(np.float32)
    return inside.reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The (image_size, image_size, 3) uint8 RGB image of `spec`, with anti-aliased edges."""
    alpha = shape_coverage(spec.shape, image_size, image_size, spec.cx, spec.cy, spec.size, spec.size)[..., None]
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    background = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    return np.round(alpha * colour + (1 - alpha) * background).astype(np.uint8)


def generate_dataset(
    n: int, rng: np.random.Generator, image_size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[str], list[ShapeSpec]]:
    """`n` random images as an (n, image_size, image_size, 3) uint8 array, with their captions and specs.

    Deterministic given the state of `rng`.
    """
    specs = [sample_spec(rng, image_size) for _ in range(n)]
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        images[i] = render(spec, image_size)
    return images, [spec.caption for spec in specs], specs


def as_float_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1] from a uint8 or float HWC numpy array, or a CHW float tensor in [0, 1]
    (a pipeline's `output_type="pt"` image)."""
    if isinstance(image, torch.Tensor):
        array = image.detach().to(torch.float32).cpu().numpy()
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
    else:
        array = np.asarray(image)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {tuple(array.shape)}")
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def estimate_background(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """The background RGB colour in [0, 1]: the per-channel median of the one-pixel border."""
    img = as_float_image(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return np.median(border, axis=0)


def foreground_mask(image: np.ndarray | torch.Tensor, threshold: float = _FOREGROUND_THRESHOLD) -> np.ndarray:
    """Boolean (H, W) mask of the pixels farther than `threshold` (RGB distance in [0, 1] units) from the background."""
    img = as_float_image(image)
    return np.linalg.norm(img - estimate_background(img), axis=-1) > threshold


def colour_votes(image: np.ndarray | torch.Tensor) -> dict[str, int]:
    """How many foreground pixels each palette colour explains best as a blend with the background."""
    img = as_float_image(image)
    background = estimate_background(img)
    pixels = img[foreground_mask(img)] - background
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32) / 255.0 - background
    # Best mixing weight of each pixel along each segment background -> colour, then the residual it leaves.
    weights = np.clip(pixels @ palette.T / np.maximum((palette**2).sum(axis=1), 1e-8), 0.0, 1.0)
    residual = np.linalg.norm(pixels[:, None, :] - weights[..., None] * palette[None], axis=-1)
    counts = np.bincount(residual.argmin(axis=1), minlength=len(COLOURS))
    return {name: int(count) for name, count in zip(COLOURS, counts)}


def dominant_colour(image: np.ndarray | torch.Tensor) -> str | None:
    """The palette colour that most foreground pixels show, or None if the image has no foreground."""
    votes = colour_votes(image)
    best = max(votes, key=votes.__getitem__)
    return best if votes[best] > 0 else None


def background_name(image: np.ndarray | torch.Tensor) -> str:
    """The background palette entry nearest to the estimated background colour."""
    background = estimate_background(image)
    names = list(BACKGROUNDS)
    palette = np.asarray([BACKGROUNDS[name] for name in names], dtype=np.float32) / 255.0
    return names[int(np.linalg.norm(palette - background, axis=1).argmin())]


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False if the mask is empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.reshape(-1))[1:]
    return labels == (int(sizes.argmax()) + 1)


def shape_scores(image: np.ndarray | torch.Tensor) -> dict[str, float]:
    """IoU of the largest foreground blob with each shape drawn into the blob's bounding box (0 when no blob)."""
    blob = largest_blob(foreground_mask(image))
    if not blob.any():
        return {shape: 0.0 for shape in SHAPES}
    rows, cols = np.nonzero(blob)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = blob[top:bottom, left:right]
    height, width = crop.shape
    scores = {}
    for shape in SHAPES:
        template = shape_coverage(shape, height, width, width / 2, height / 2, height, width) >= 0.5
        union = np.logical_or(crop, template).sum()
        scores[shape] = float(np.logical_and(crop, template).sum() / union) if union else 0.0
    return scores


def classify_shape(image: np.ndarray | torch.Tensor) -> str | None:
    """The shape whose template best matches the largest foreground blob, or None if the image has no foreground."""
    scores = shape_scores(image)
    best = max(scores, key=scores.__getitem__)
    return best if scores[best] > 0 else None


@functools.lru_cache(maxsize=4096)
def shape_template(shape: str, height: int, width: int) -> np.ndarray:
    """Read-only boolean (height, width) mask of `shape` filling the whole box, exactly as `shape_scores` draws it.

    Cached because a batch of blobs keeps asking for the same few box sizes; read-only so that the cache stays valid.
    """
    template = shape_coverage(shape, height, width, width / 2, height / 2, height, width) >= 0.5
    template.setflags(write=False)
    return template


def blob_shape_scores(blob: np.ndarray) -> dict[str, float]:
    """`shape_scores` for an already computed blob mask: IoU of the blob, cropped to its bounding box, with each
    shape's template (0 for an empty blob)."""
    if not blob.any():
        return {shape: 0.0 for shape in SHAPES}
    rows, cols = np.nonzero(blob)
    crop = blob[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scores = {}
    for shape in SHAPES:
        template = shape_template(shape, *crop.shape)
        scores[shape] = float(np.logical_and(crop, template).sum() / np.logical_or(crop, template).sum())
    return scores
