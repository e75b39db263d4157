"""Validation images: a fixed-seed grid saved as PNG and logged to the trackers (tensorboard)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def image_grid(rows: list[list[Image.Image]], min_cell: int = 64, labels: list[str] | None = None) -> Image.Image:
    """Rows of images (each row may have its own length) pasted on a white canvas; tiny images are
    upscaled (nearest) to ``min_cell`` pixels so that a grid from a 32 px model is still visible."""
    cell_w = max(max(img.width for img in row) for row in rows if row)
    cell_h = max(max(img.height for img in row) for row in rows if row)
    scale = max(1, -(-min_cell // min(cell_w, cell_h)))
    cw, ch = cell_w * scale, cell_h * scale
    label_h = 14 if labels else 0
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * cw, len(rows) * (ch + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = r * (ch + label_h)
        if labels:
            draw.text((2, y + 1), labels[r][: max(8, cols * cw // 6)], fill="black")
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((img.width * scale, img.height * scale), Image.NEAREST),
                       (c * cw, y + label_h))
    return grid


def log_images(accelerator, tag: str, images: list[Image.Image], step: int) -> None:
    """Send images to the active trackers (tensorboard: add_images; wandb: Image list)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            arrays = np.stack([np.asarray(img.convert("RGB").resize(images[0].size)) for img in images])
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img) for img in images]}, step=step)


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
