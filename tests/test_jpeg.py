import io

import numpy as np
import pytest
import torch
from PIL import Image

from rebel_diffusion.rewards import make_reward_fn
from rebel_diffusion.rewards.jpeg import jpeg_size_kb


def test_size_is_the_quality_95_jpeg_in_kilobytes():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 24, 40)
    sizes = jpeg_size_kb(images)
    for image, size in zip(images, sizes):
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        assert size.item() == pytest.approx(buffer.tell() / 1000)


def test_compressibility_prefers_flat_images_and_is_the_negated_size():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    compressibility = make_reward_fn("jpeg_compressibility")(images, ["a", "b"])
    incompressibility = make_reward_fn("jpeg_incompressibility")(images, ["a", "b"])
    assert compressibility[0] > compressibility[1]
    torch.testing.assert_close(compressibility, -incompressibility)
    assert compressibility.shape == (2,) and compressibility.dtype == torch.float32


def test_out_of_range_values_are_clamped_not_wrapped():
    bright = torch.full((1, 3, 16, 16), 1.7)
    white = torch.ones(1, 3, 16, 16)
    assert np.isclose(jpeg_size_kb(bright).item(), jpeg_size_kb(white).item())
