"""Images out: [-1, 1] tensors to PIL, captioned grids, and one PNG per sample."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 14  # pixels of the text strip above each row
PADDING = 2
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One [3, H, W] image in [-1, 1] as an RGB PIL image."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image, got {tuple(image.shape)}")
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """An RGB PIL image as [3, H, W] in [-1, 1], optionally resized to `size` x `size`."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """An image file as [3, H, W] in [-1, 1]; a missing file names itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {path}")
    with Image.open(path) as opened:
        return from_pil(opened, size)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def captioned_grid(
    rows: Sequence[torch.Tensor], labels: Sequence[str] | None = None
) -> Image.Image:
    """A grid with one row per tensor [N_i, 3, H, W] (rows may differ in length; every image shares
    H and W), each row under a strip holding its label."""
    if not rows:
        raise ValueError("captioned_grid needs at least one row")
    labels = list(labels) if labels is not None else [""] * len(rows)
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    height, width = rows[0].shape[-2:]
    columns = max(len(row) for row in rows)
    label_height = LABEL_HEIGHT if any(labels) else 0
    cell_w, cell_h = width + PADDING, height + PADDING + label_height
    grid = Image.new("RGB", (columns * cell_w + PADDING, len(rows) * cell_h + PADDING), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        if tuple(row.shape[-2:]) != (height, width):
            raise ValueError(
                f"row {r} holds {tuple(row.shape[-2:])} images, row 0 {(height, width)}"
            )
        top = r * cell_h + PADDING
        if label:
            draw.text((PADDING, top), label, fill=TEXT_COLOUR, font=font)
        for c, image in enumerate(row):
            grid.paste(to_pil(image), (c * cell_w + PADDING, top + label_height))
    return grid


def slug(text: str, max_length: int = 48) -> str:
    """A file-name-safe version of a caption."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length] or "image"


def save_images(images: torch.Tensor, folder: str | Path, names: Sequence[str]) -> list[Path]:
    """One PNG per image, `folder/<name>.png`; returns the paths."""
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names, strict=True):
        path = folder / f"{name}.png"
        to_pil(image).save(path)
        paths.append(path)
    return paths
