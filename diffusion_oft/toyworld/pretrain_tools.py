"""Building blocks of the toy model's pretraining stages (``pretrain``, ``decoder``): rendered datasets,
the learning-rate schedule, the VAE stage, the pipeline and its in-world judge, image grids."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from . import components, world
from .judge import judge_in_world


def render_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n scenes as a (n, 3, 64, 64) uint8 tensor and their captions."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(world.render(s)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [world.caption(s) for s in scenes]


def render_vae_dataset(world_pixels: torch.Tensor, n_generic: int, seed: int) -> torch.Tensor:
    """The autoencoder's images: the world scenes plus ``n_generic`` random generic images."""
    rng = random.Random(seed + 1)
    generic = np.stack([np.asarray(world.generic_image(rng)) for _ in range(n_generic)])
    return torch.cat([world_pixels, torch.from_numpy(generic).permute(0, 3, 1, 2)])


@torch.no_grad()
def reconstruct(vae, images) -> list:
    """PIL images encoded (posterior mean) and decoded by ``vae``, as PIL images."""
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    recon = vae.decode(vae.encode(to_unit(x)).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(r) for r in recon]


def subject_reconstruction(vae) -> float:
    """Subject fidelity of the VAE's reconstructions of subject images (can it represent the subject?)."""
    from .judge import judge_subject

    rng = random.Random(7)
    images = [world.render(world.subject_scene(rng)) for _ in range(8)]
    return judge_subject(reconstruct(vae, images), ["white"] * len(images))["subject_fidelity"]


def image_gradient_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of two (B, 3, H, W) images: stripes and edges."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(recon), dx(x)) + F.l1_loss(dy(recon), dy(x))


def to_unit(pixels_uint8: torch.Tensor) -> torch.Tensor:
    return pixels_uint8.float() / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def equivariant_pair(z: torch.Tensor, x: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """EQ-VAE's transform τ (Kouzelis et al. 2025), applied alike to latents z (B, C, h, w) and their images
    x (B, 3, H, W): a random quarter turn, then a downscale by ½ or ¾ (bilinear, antialiased). Decoding τ(z)
    must give τ(x), which leaves the latent less high-frequency code (EQ-VAE reports faster diffusion training;
    on the toy world's 8-channel latent it did not suffice, see benchmarks/README "vae_ceiling.py")."""
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    scale = (0.5, 0.75)[int(torch.randint(0, 2, (1,), generator=generator))]
    z, x = torch.rot90(z, turns, (2, 3)), torch.rot90(x, turns, (2, 3))
    factor = x.shape[-1] // z.shape[-1]  # the VAE's downsampling (4 for the toy model)
    z = F.interpolate(z, scale_factor=scale, mode="bilinear", antialias=True)
    x = F.interpolate(x, size=(z.shape[-2] * factor, z.shape[-1] * factor), mode="bilinear", antialias=True)
    return z, x


def train_vae(
    vae,
    pixels,
    steps: int,
    batch_size: int,
    lr: float,
    generator,
    log,
    gradient_weight: float = 0.0,
    equivariance: float = 0.0,
) -> None:
    """L1 + MSE reconstruction of a posterior sample (+ ``gradient_weight`` × image-gradient L1, which keeps
    stripes and edges) + 1e-6 × KL. With ``equivariance`` p, a step is an EQ-VAE step with probability p:
    the latent and the image both go through ``equivariant_pair`` first."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=50)
        idx = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        x = to_unit(pixels[idx])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        if equivariance and float(torch.rand(1, generator=generator)) < equivariance:
            z, x = equivariant_pair(z, x, generator)
        recon = vae.decode(z).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec_loss + 1e-6 * posterior.kl().mean()
        if gradient_weight:
            loss = loss + gradient_weight * image_gradient_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step:5d}/{steps}  reconstruction {rec_loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, pixels, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        posterior = vae.encode(to_unit(pixels[i : i + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def standardise_latent(vae, latent_mean: torch.Tensor) -> None:
    """Fold z' = (z − μ_c) / σ_c (per channel, from ``latent_mean`` (N, C, h, w)) into ``vae``."""
    mu, sd = latent_mean.mean((0, 2, 3)), latent_mean.std((0, 2, 3))
    c = mu.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv  # 1×1 convs: (2C → 2C) moments, (C → C)
    q.weight[:c] /= sd.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) / sd
    q.bias[c:] -= 2 * sd.log()  # log-variance of z'
    pq.bias += pq.weight[:, :, 0, 0] @ mu
    pq.weight *= sd.view(1, -1, 1, 1)


def build_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(**components.make_scheduler_config())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


JUDGE_STEPS = 20
JUDGE_GUIDANCE = 4.0


@torch.no_grad()
def judge_pipeline(
    pipe,
    seeds=(0, 1),
    steps: int = JUDGE_STEPS,
    guidance_scale: float = JUDGE_GUIDANCE,
    cross_attention_kwargs=None,
    targets: list[tuple[str, str, str]] | None = None,
):
    """Generate every in-world prompt (or every (shape, colour, background) of ``targets``) once per
    seed; returns (scores, images, targets)."""
    targets = targets or world.in_world_prompts()
    prompts = [f"a {c} {s} on a {b} background" for s, c, b in targets]
    images, all_targets = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        out = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=g,
            height=world.IMAGE_SIZE,
            width=world.IMAGE_SIZE,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        images += out.images
        all_targets += targets
    return judge_in_world(images, all_targets), images, all_targets


def image_grid(images, columns: int):
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid
