"""Flow-matching targets (diffusion_oft.training.flow) against the formulas, written out here."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

import diffusion_oft as do
from diffusion_oft.config import JOINT_ATTENTION_TARGETS
from diffusion_oft.tiny import tiny_flux_pipeline
from diffusion_oft.training.flow import (
    WEIGHTING_SCHEMES,
    add_flow_matching_args,
    flow_matching_loss,
    flux_guidance,
    noisy_latents,
    sample_flow_timesteps,
)


def expected_u(scheme: str, batch: int, seed: int, mean: float, std: float, mode_scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if scheme == "logit_normal":
        return 1 / (1 + torch.exp(-torch.normal(mean, std, (batch,), generator=g)))
    u = torch.rand((batch,), generator=g)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_timestep_sampling_and_loss_match_the_formulas(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    batch, mean, std, mode_scale = 64, 0.3, 1.2, 1.29
    timesteps, sigmas = sample_flow_timesteps(
        scheduler, batch, scheme, mean, std, mode_scale, generator=torch.Generator().manual_seed(7)
    )
    u = expected_u(scheme, batch, 7, mean, std, mode_scale)
    index = torch.clamp((u * 1000).long(), 0, 999)
    # the scheduler's training grid: σ(t) = shift·s / (1 + (shift − 1)·s), s = t / 1000, t = 1000 ... 1
    s = torch.linspace(1, 1000, 1000).flip(0) / 1000
    grid = 3.0 * s / (1 + 2.0 * s)
    assert torch.allclose(sigmas, grid[index], atol=1e-6)  # float32 rounding of the same expression
    assert torch.allclose(timesteps, grid[index] * 1000, atol=1e-3)
    assert sigmas.shape == (batch,) and bool(((sigmas > 0) & (sigmas <= 1)).all())

    g = torch.Generator().manual_seed(1)
    x, eps, pred = (torch.randn(batch, 4, 3, 3, generator=g) for _ in range(3))
    sig = sigmas.view(-1, 1, 1, 1)
    assert torch.equal(noisy_latents(x, eps, sigmas), (1 - sig) * x + sig * eps)
    weight = {
        "sigma_sqrt": sig**-2.0,
        "cosmap": 2 / (math.pi * (1 - 2 * sig + 2 * sig**2)),
    }.get(scheme, torch.ones_like(sig))
    per_sample = (weight * (pred - (eps - x)) ** 2).mean(dim=(1, 2, 3))
    got = flow_matching_loss(pred, x, eps, sigmas, scheme, reduction="none")
    assert torch.allclose(got, per_sample, rtol=1e-6)
    assert torch.allclose(flow_matching_loss(pred, x, eps, sigmas, scheme), per_sample.mean(), rtol=1e-6)
    # SD3's preconditioned outputs: the prediction becomes an estimate of x, the target x
    x_hat = pred * (-sig) + ((1 - sig) * x + sig * eps)
    want = (weight * (x_hat - x) ** 2).mean(dim=(1, 2, 3)).mean()
    got = flow_matching_loss(pred, x, eps, sigmas, scheme, precondition_outputs=True)
    assert torch.allclose(got, want, rtol=1e-5)


def test_flow_args_and_errors():
    parser = argparse.ArgumentParser()
    add_flow_matching_args(parser, default_scheme="none")
    args = parser.parse_args(["--logit_std", "0.5"])
    assert (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale) == ("none", 0.0, 0.5, 1.29)
    with pytest.raises(ValueError, match="--weighting_scheme 'uniform': use one of"):
        sample_flow_timesteps(FlowMatchEulerDiscreteScheduler(), 2, "uniform")
    used = FlowMatchEulerDiscreteScheduler()
    used.set_timesteps(4)
    with pytest.raises(ValueError, match="use a fresh copy for training"):
        sample_flow_timesteps(used, 2)


@pytest.mark.parametrize("dev", [True, False])
def test_flux_training_step_passes_guidance_for_dev_only(dev):
    """One flow-matching step on the tiny Flux transformer with packed latents: the guidance embedding
    gets the guidance scale on the dev layout and nothing on schnell; the adapter gets gradients."""
    pipe = tiny_flux_pipeline(guidance_embeds=dev)
    transformer = pipe.transformer
    do.add_adapter(transformer, do.AdapterConfig(method="oft", block_size=8, target_modules=JOINT_ATTENTION_TARGETS))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=g)  # (batch, VAE channels, h, w)
    noise = torch.randn(latents.shape, generator=g)
    timesteps, sigmas = sample_flow_timesteps(pipe.scheduler, 2, "none", generator=g)
    noisy = noisy_latents(latents, noise, sigmas)
    packed = FluxPipeline._pack_latents(noisy, 2, 16, 8, 8)  # (2, 16 tokens, 64)
    image_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt("a photo of sks dog", prompt_2=None, max_sequence_length=16)
    guidance = flux_guidance(transformer, 3.5, 2)
    if dev:
        assert torch.equal(guidance, torch.full((2,), 3.5))
    else:
        assert guidance is None
    pred = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled.repeat(2, 1),
        encoder_hidden_states=prompt_embeds.repeat(2, 1, 1),
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    pred = FluxPipeline._unpack_latents(pred, 16, 16, 2)  # vae_scale_factor 2: back to (2, 16, 8, 8)
    assert pred.shape == latents.shape
    loss = flow_matching_loss(pred, latents, noise, sigmas, "none")
    loss.backward()
    grads = [p.grad for p in transformer.parameters() if p.requires_grad]
    assert grads and all(gr is not None for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
