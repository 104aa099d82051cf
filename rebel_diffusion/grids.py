"""Labelled image grids: one drawing function for every grid a run or `sample` writes.

A grid has a label column on the left (one label per row, e.g. the prompt, wrapped to fit), an optional header band on
top (one label per column, e.g. "base" / "fine-tuned" and the seed), and tiles of `CELL` x `CELL` pixels. Tiny images
(the 32 px quickstart LCM) are upscaled by nearest neighbour, by a whole factor when the side divides `CELL`, so every
model pixel stays a sharp square; larger images are resized to `CELL` with a bilinear filter to keep the PNG light.
`tile_box` gives where a tile lies, so that callers and tests locate a (row, column) without repeating the arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

CELL = 128  # side of a tile in the grid
LABEL_WIDTH = 200  # the row-label column
LINE_HEIGHT = 13  # one line of PIL's default font (10 pt, 12 px from ascender to descender) and a pixel of spacing
PAD = 4
HEADER_LINES = 2  # a header band holds two lines, e.g. "fine-tuned" over "seed 3"
HEADER_HEIGHT = HEADER_LINES * LINE_HEIGHT + 2 * PAD


def header_height(column_labels: list[str] | None) -> int:
    """The height of the header band: 0 without column labels."""
    return HEADER_HEIGHT if column_labels else 0


def tile_box(row: int, column: int, column_labels: list[str] | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the tile at (`row`, `column`) in a grid drawn with `column_labels`."""
    left, top = LABEL_WIDTH + column * CELL, header_height(column_labels) + row * CELL
    return left, top, left + CELL, top + CELL


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def wrap(text: str, width: int, max_lines: int, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels, at most `max_lines`; a cut text ends in "..."
    (a word wider than the line is cut too)."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words and lines:  # the text goes on past the last line
        lines[-1] += " ..."
    return [_fit(line, width, draw, font) for line in lines]


def _fit(line: str, width: int, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> str:
    """`line`, or as much of it as fits in `width` pixels followed by "..."."""
    if draw.textlength(line, font=font) <= width:
        return line
    line = line.removesuffix(" ...")
    while line and draw.textlength(line + "...", font=font) > width:
        line = line[:-1]
    return line.rstrip() + "..."


def _tile(image: torch.Tensor) -> Image.Image:
    """One `(3, H, W)` image in [0, 1] as a `CELL` x `CELL` PIL image."""
    pixels = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    tile = Image.fromarray(pixels)
    return tile.resize((CELL, CELL), Image.NEAREST if max(tile.size) < CELL else Image.BILINEAR)


def draw_image_grid(images: torch.Tensor, row_labels: list[str], column_labels: list[str] | None = None) -> Image.Image:
    """`images` `(rows, columns, 3, H, W)` in [0, 1] as one labelled RGB image (layout: `tile_box`).

    Each row label is wrapped into the label column, as many lines as a tile is tall; each column label ("\\n" breaks
    it) is written in the header band over its tile, at most `HEADER_LINES` lines.
    """
    rows, columns = images.shape[:2]
    if len(row_labels) != rows or (column_labels is not None and len(column_labels) != columns):
        raise ValueError(f"{rows} x {columns} images need as many row and column labels, got {len(row_labels)} and "
                         f"{None if column_labels is None else len(column_labels)}")
    top = header_height(column_labels)
    grid = Image.new("RGB", (LABEL_WIDTH + columns * CELL, top + rows * CELL), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    for c, label in enumerate(column_labels or []):
        for i, line in enumerate(label.split("\n")[:HEADER_LINES]):
            text = wrap(line, CELL - 2 * PAD, 1, draw, font)
            draw.text((LABEL_WIDTH + c * CELL + PAD, PAD + i * LINE_HEIGHT), text[0] if text else "", fill="black",
                      font=font)
    max_lines = (CELL - 2 * PAD) // LINE_HEIGHT
    for r in range(rows):
        lines = wrap(row_labels[r], LABEL_WIDTH - 2 * PAD, max_lines, draw, font)
        y = top + r * CELL + (CELL - len(lines) * LINE_HEIGHT) // 2  # centred on the row
        for i, line in enumerate(lines):
            draw.text((PAD, y + i * LINE_HEIGHT), line, fill="black", font=font)
        for c in range(columns):
            grid.paste(_tile(images[r, c]), tile_box(r, c, column_labels)[:2])
    return grid


def save_image_grid(images: torch.Tensor, row_labels: list[str], path: str | Path,
                    column_labels: list[str] | None = None) -> None:
    """Save `draw_image_grid(images, row_labels, column_labels)` as a PNG at `path`."""
    draw_image_grid(images, row_labels, column_labels).save(path)


__all__ = ["CELL", "HEADER_HEIGHT", "LABEL_WIDTH", "draw_image_grid", "header_height", "save_image_grid", "tile_box",
           "wrap"]
