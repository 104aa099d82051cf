"""JPEG (in)compressibility rewards as DDPO defines them: the image's size in kB when saved as JPEG at quality 95."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from rebel_diffusion.rewards import RewardFn, register_reward


def jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    """Sizes in kB (1 kB = 1000 bytes) of `images` `(B, 3, H, W)` in [0, 1] saved as JPEG at quality 95 -> `(B,)`."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(device=None, dtype=None) -> RewardFn:
    """Negative JPEG size in kB: smaller files score higher."""
    return lambda images, prompts: -jpeg_size_kb(images)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(device=None, dtype=None) -> RewardFn:
    """JPEG size in kB: larger files score higher."""
    return lambda images, prompts: jpeg_size_kb(images)
