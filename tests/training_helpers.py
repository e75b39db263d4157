"""Helpers shared by the training tests: tiny models on disk, tiny image folders, fixed-batch losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def make_subject_images(folder: Path, n: int = 3, size: int = 20) -> Path:
    """n photos of a 'subject' (a yellow disc with a red dot) on blue, slightly different each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size + 2 * i, size), (40, 60, 200))
        draw = ImageDraw.Draw(img)
        draw.ellipse([3 + i, 3, size - 3 + i, size - 3], fill=(240, 220, 40))
        draw.ellipse([size // 2 - 2 + i, size // 2 - 2, size // 2 + 2 + i, size // 2 + 2], fill=(220, 30, 30))
        img.save(folder / f"subject_{i}.png")
    return folder


def read_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@torch.no_grad()
def fixed_batch_loss(pipe, images_dir: Path, prompt: str, resolution: int, n_draws: int = 8) -> float:
    """The denoising loss of ``pipe.unet`` on the images, with fixed noise and timesteps."""
    from diffusion_oft.training.data import list_images, load_rgb, resize_and_crop, to_tensor

    pixels = torch.stack(
        [to_tensor(resize_and_crop(load_rgb(p), resolution, True, None)[0]) for p in list_images(images_dir)]
    )
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer([prompt] * len(pixels), padding="max_length", truncation=True, return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    g = torch.Generator().manual_seed(123)
    sched = pipe.scheduler
    losses = []
    for _ in range(n_draws):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(50, 950, (len(latents),), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        losses.append(torch.nn.functional.mse_loss(pipe.unet(noisy, t, text).sample, noise).item())
    return float(np.mean(losses))


def generate(pipe, prompt: str, resolution: int, seed: int = 0, steps: int = 3) -> np.ndarray:
    out = pipe(
        prompt,
        num_inference_steps=steps,
        height=resolution,
        width=resolution,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images
    return np.asarray(out)
