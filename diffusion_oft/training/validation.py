"""Validation images: a fixed-seed grid saved as PNG (``diffusion_oft.images``) and logged to the trackers."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..images import image_grid, save_grid

__all__ = ["image_grid", "log_images", "save_grid"]


def log_images(accelerator, tag: str, images: list[Image.Image], step: int) -> None:
    """Send images to the active trackers (tensorboard: add_images; wandb: Image list)."""
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            arrays = np.stack([np.asarray(img.convert("RGB").resize(images[0].size)) for img in images])
            tracker.writer.add_images(tag, arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img) for img in images]}, step=step)
