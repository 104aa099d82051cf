"""The labelled grid every run and `sample` writes: layout, nearest-neighbour upscaling, wrapped labels."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rebel_diffusion.grids import CELL, HEADER_HEIGHT, LABEL_WIDTH, draw_image_grid, save_image_grid, tile_box, wrap


def known_images(rows: int, columns: int, side: int = 32) -> torch.Tensor:
    """Tile (r, c) is flat grey at level (10 r + c) / 255 with a white top-left pixel, so position and orientation show."""
    images = torch.zeros(rows, columns, 3, side, side)
    for r in range(rows):
        for c in range(columns):
            images[r, c] = (10 * r + c) / 255
            images[r, c, :, 0, 0] = 1.0
    return images


def test_tiles_sit_where_tile_box_says_upscaled_by_nearest_neighbour(tmp_path):
    images = known_images(3, 2)
    save_image_grid(images, ["one", "two", "three"], tmp_path / "grid.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert grid.shape == (3 * CELL, LABEL_WIDTH + 2 * CELL, 3)  # no column labels: no header band
    scale = CELL // 32
    for r in range(3):
        for c in range(2):
            left, top, right, bottom = tile_box(r, c)
            tile = grid[top:bottom, left:right]
            assert (tile[:scale, :scale] == 255).all() and (tile[scale:, scale:] == 10 * r + c).all(), (r, c)
            assert tile[scale, 0, 0] == 10 * r + c  # the white pixel is exactly scale x scale


def test_column_labels_add_a_header_band_and_shift_the_tiles_down():
    images = known_images(2, 2)
    grid = np.asarray(draw_image_grid(images, ["a", "b"], ["base\nseed 0", "fine-tuned\nseed 0"]))
    assert grid.shape == (HEADER_HEIGHT + 2 * CELL, LABEL_WIDTH + 2 * CELL, 3)
    assert tile_box(1, 1, ["x", "y"]) == (LABEL_WIDTH + CELL, HEADER_HEIGHT + CELL, LABEL_WIDTH + 2 * CELL,
                                          HEADER_HEIGHT + 2 * CELL)
    left, top, _, _ = tile_box(1, 0, ["x", "y"])
    assert (grid[top + 4 : top + CELL, left + 4 : left + CELL] == 10).all()
    for c in range(2):
        band = grid[:HEADER_HEIGHT, LABEL_WIDTH + c * CELL : LABEL_WIDTH + (c + 1) * CELL]
        assert (band < 128).any(), f"column {c} has no label"
    assert (grid[:HEADER_HEIGHT, :LABEL_WIDTH] == 255).all()  # the corner over the row labels stays blank


def test_each_row_label_is_drawn_inside_its_own_row_and_long_prompts_wrap():
    long = "a photograph of an astronaut riding a horse on the moon, " * 6
    grid = np.asarray(draw_image_grid(known_images(2, 1), ["a red circle", long]))
    column = grid[:, :LABEL_WIDTH]
    ink = np.flatnonzero((column < 128).any(axis=(1, 2)))
    assert ink.size and ((ink < CELL) | (ink >= CELL)).all()
    first, second = ink[ink < CELL], ink[ink >= CELL]
    assert first.size and second.size
    assert second.max() - second.min() > 5 * 13 - 13, "the long prompt was not wrapped onto several lines"
    assert second.max() < 2 * CELL

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    lines = wrap(long * 2, 190, 9, draw, font)
    assert len(lines) == 9 and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 190 for line in lines)
    assert wrap("a red circle", 190, 9, draw, font) == ["a red circle"]
    assert wrap("supercalifragilistic" * 5, 60, 2, draw, font)[0].endswith("...")  # one word wider than the line


def test_labels_must_match_the_images():
    with pytest.raises(ValueError, match="labels"):
        draw_image_grid(known_images(2, 2), ["only one"])
