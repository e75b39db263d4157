"""Flow-matching training targets for SD3 / SD3.5 and FLUX.1 (rectified flow, Esser et al. 2024).

A sample at noise level ``σ`` is ``x_σ = (1 − σ)·x + σ·ε``; the transformer predicts the velocity
``ε − x``.  The noise levels are drawn as diffusers' DreamBooth scripts for SD3 / Flux draw them: ``u`` from
``compute_density_for_timestep_sampling`` (``logit_normal``: sigmoid of N(logit_mean, logit_std²);
``mode``: ``1 − u − mode_scale·(cos²(πu/2) − 1 + u)``; otherwise uniform), the timestep
``scheduler.timesteps[⌊u·N⌋]`` and its ``σ = scheduler.sigmas[⌊u·N⌋]`` (N = num_train_timesteps); the
per-sample loss weight is ``compute_loss_weighting_for_sd3`` (``sigma_sqrt``: σ⁻², ``cosmap``:
2 / (π(1 − 2σ + 2σ²)), otherwise 1).
"""

from __future__ import annotations

import argparse

import torch

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def add_flow_matching_args(parser: argparse.ArgumentParser, default_scheme: str | None = "logit_normal") -> None:
    """``--weighting_scheme``, ``--logit_mean``, ``--logit_std``, ``--mode_scale`` with diffusers' defaults
    (its SD3 scripts default to logit_normal, its Flux scripts to none: pass ``default_scheme``; None leaves
    the choice to the caller, e.g. per model family)."""
    parser.add_argument(
        "--weighting_scheme",
        default=default_scheme,
        choices=WEIGHTING_SCHEMES,
        help="how noise levels are sampled / losses weighted (flow-matching models: SD3, Flux; default "
        + (default_scheme or "SD3 logit_normal, Flux none")
        + ")",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal scheme")
    parser.add_argument("--logit_std", type=float, default=1.0, help="standard deviation of the logit_normal scheme")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode scheme")


def check_weighting_scheme(scheme: str) -> None:
    if scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"--weighting_scheme {scheme!r}: use one of {', '.join(WEIGHTING_SCHEMES)}")


def sample_flow_timesteps(
    scheduler,
    batch: int,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas), both float32 of shape (batch,), for a FlowMatchEulerDiscreteScheduler in its
    training state (``scheduler.timesteps`` / ``sigmas`` of num_train_timesteps entries, as built).

    ``u`` is drawn on the CPU from ``generator``; its index ``⌊u·N⌋`` is clamped to N − 1 (``mode`` gives
    u = 1 at u₀ = 0, and a float32 sigmoid can round to 1; diffusers' scripts would index past the end)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    check_weighting_scheme(weighting_scheme)
    u = compute_density_for_timestep_sampling(
        weighting_scheme,
        batch,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device="cpu",
        generator=generator,
    )
    n = scheduler.config.num_train_timesteps
    if len(scheduler.timesteps) != n:
        raise ValueError(
            f"the scheduler has {len(scheduler.timesteps)} timesteps, not its num_train_timesteps={n}: "
            "use a fresh copy for training (set_timesteps for inference changes them)"
        )
    indices = (u * n).long().clamp(0, n - 1)
    timesteps = scheduler.timesteps[indices].float()
    sigmas = scheduler.sigmas[indices].float()
    return timesteps.to(device), sigmas.to(device)


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch,) -> (batch, 1, ...) with like.ndim dims, like's dtype and device."""
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x + σ·ε (sigmas: (batch,))."""
    s = _expand(sigmas, latents)
    return (1.0 - s) * latents + s * noise


def flow_matching_loss(
    model_pred: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "logit_normal",
    precondition_outputs: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted MSE of the velocity prediction, in float32.

    Target ``ε − x`` (the default, as for Flux); ``precondition_outputs=True`` (diffusers' SD3 scripts'
    option) turns the prediction into an estimate of ``x`` (``pred·(−σ) + x_σ``) and the target into ``x``.
    ``reduction="none"`` gives the (batch,) per-sample losses (e.g. to split instance and prior images)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    check_weighting_scheme(weighting_scheme)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    pred, x, eps = model_pred.float(), latents.float(), noise.float()
    s = _expand(sigmas.float(), x)
    if precondition_outputs:
        pred = pred * (-s) + ((1.0 - s) * x + s * eps)
        target = x
    else:
        target = eps - x
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas=s)
    per_sample = (weighting.float() * (pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
    return per_sample if reduction == "none" else per_sample.mean()


def flux_guidance(transformer, guidance_scale: float, batch: int, device=None) -> torch.Tensor | None:
    """The ``guidance=`` input of a FluxTransformer2DModel: (batch,) float32 of ``guidance_scale`` for the
    FLUX.1-dev layout (``config.guidance_embeds``), None for schnell (which has no guidance embedding)."""
    if not getattr(transformer.config, "guidance_embeds", False):
        return None
    return torch.full((batch,), float(guidance_scale), dtype=torch.float32, device=device)
