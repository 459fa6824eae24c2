"""Pictures a person reads: image tiles upscaled (nearest neighbour) to at least 96 px, a label over
each column, a label before each row and an optional caption under each tile.

    labelled_grid(tiles, column_labels=[...], row_labels=[...], captions=[[...], ...]).save(path)
    numbered_grid(images, title="...")       # N images on a square grid, #index under each

tiles: a list of rows, each a list of (C, H, W) tensors in [-1, 1] (C = 1 or 3), or None for an
empty cell. Latents are shown with `as_picture(x_T)`: scaled to their own range, since they are
not images in [-1, 1].
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 96
PAD = 4


def as_picture(latent: torch.Tensor) -> torch.Tensor:
    """A latent (C, H, W) mapped linearly from its own [min, max] onto [-1, 1] for display."""
    low, high = latent.min(), latent.max()
    return (latent - low) / (high - low).clamp(min=1e-12) * 2 - 1


def _tile_image(tile: torch.Tensor, size: int) -> Image.Image:
    pixels = ((tile.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")
    return image.convert("RGB").resize((size, size), Image.NEAREST)


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:          # Pillow < 10.1: the bitmap font has no sizes
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def labelled_grid(tiles: Sequence[Sequence[Optional[torch.Tensor]]], column_labels: Sequence[str] = (),
                  row_labels: Sequence[str] = (), captions: Optional[Sequence[Sequence[str]]] = None,
                  title: str = "", fit_title: bool = False) -> Image.Image:
    """The grid as an RGB PIL image (see the module header).

    fit_title: the title may hold several lines ("\n"), and the canvas is widened to the widest of
    them (by default the title is one line, cut off where the grid ends).
    """
    rows = [list(r) for r in tiles]
    if not rows or not any(t is not None for r in rows for t in r):
        raise ValueError("a picture needs at least one tile")
    first = next(t for r in rows for t in r if t is not None)
    size = max(MIN_TILE, int(first.shape[-1]) * max(1, -(-MIN_TILE // int(first.shape[-1]))))
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = 16
    label_w = max([_text_width(probe, s, font) for s in row_labels] + [0]) + (2 * PAD if row_labels else 0)
    title_lines = (title.split("\n") if fit_title else [title]) if title else []
    top = line * len(title_lines) + (line if column_labels else 0)
    caption_h = line if captions else 0
    columns = max(len(r) for r in rows)
    width = label_w + columns * (size + PAD) + PAD
    if fit_title:
        width = max([width] + [_text_width(probe, s, font) + 2 * PAD for s in title_lines])
    height = top + len(rows) * (size + caption_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(title_lines):
        draw.text((PAD, 1 + k * line), text, fill="black", font=font)
    y_labels = line * len(title_lines)
    for c, text in enumerate(column_labels):
        x = label_w + PAD + c * (size + PAD) + (size - _text_width(draw, text, font)) // 2
        draw.text((x, y_labels + 1), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y = top + PAD + r * (size + caption_h + PAD)
        if r < len(row_labels):
            draw.text((PAD, y + size // 2 - 6), row_labels[r], fill="black", font=font)
        for c, tile in enumerate(row):
            x = label_w + PAD + c * (size + PAD)
            if tile is not None:
                canvas.paste(_tile_image(tile, size), (x, y))
            if captions and r < len(captions) and c < len(captions[r]) and captions[r][c]:
                text = captions[r][c]
                draw.text((x + (size - _text_width(draw, text, font)) // 2, y + size + 1), text,
                          fill="black", font=font)
    return canvas


def numbered_grid(images: torch.Tensor, title: str = "", columns: Optional[int] = None) -> Image.Image:
    """Images (N, C, H, W) in [-1, 1] on a near-square grid (`columns` per row, default
    ceil(sqrt(N))), each upscaled as in labelled_grid with its index #n under it, under a title of
    one or more lines that the canvas is widened to fit."""
    count = int(images.shape[0])
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = [list(images[k:k + columns]) for k in range(0, count, columns)]
    captions = [[f"#{r * columns + c}" for c in range(len(row))] for r, row in enumerate(rows)]
    return labelled_grid(rows, captions=captions, title=title, fit_title=True)


def save_picture(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG (atomically: a half-written picture never replaces a good one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
