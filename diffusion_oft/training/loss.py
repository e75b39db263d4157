"""The diffusion training loss: noise sampling (with offset), targets, min-SNR weighting, prior loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents`` from ``generator`` (CPU), plus the per-channel noise offset."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32
        )
    return noise.to(device=latents.device, dtype=latents.dtype)


TIMESTEP_BIASES = ("none", "cubic")
LOSS_SPACES = ("epsilon", "v")


def sample_timesteps(batch: int, scheduler, generator: torch.Generator, device, bias: str = "none") -> torch.Tensor:
    """Training timesteps: uniform (``bias="none"``), or ``"cubic"``: t = (1 - u^3) T with u uniform
    (T2I-Adapter's schedule; P(t >= T/2) = 0.79), which gives the high-noise steps, where layout is
    decided, most of the batch."""
    n = scheduler.config.num_train_timesteps
    if bias == "none":
        t = torch.randint(0, n, (batch,), generator=generator)
    elif bias == "cubic":
        u = torch.rand((batch,), generator=generator)
        t = ((1.0 - u**3) * n).long().clamp_(0, n - 1)
    else:
        raise ValueError(f"unknown timestep bias {bias!r}; choose one of {', '.join(TIMESTEP_BIASES)}")
    return t.to(device=device, dtype=torch.long)


def compute_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar) (Min-SNR, Hang et al. 2023)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def loss_space_weights(scheduler, timesteps: torch.Tensor, space: str) -> torch.Tensor:
    """Per-example factor that turns the MSE on the model's own target into the MSE in ``space``.

    The errors are tied by d_eps = sqrt(alpha_bar) d_v, so for an epsilon model the v-space MSE is
    eps-MSE / alpha_bar = eps-MSE (1 + 1/SNR): about 1 at low noise and up to 1/alpha_bar_T (~200 for
    SD's schedule) at the last steps, where the eps loss hardly sees the layout (x0 error = eps error / sqrt(SNR))."""
    if space not in LOSS_SPACES:
        raise ValueError(f"unknown loss space {space!r}; choose one of {', '.join(LOSS_SPACES)}")
    alpha_bar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    native = "v" if scheduler.config.prediction_type == "v_prediction" else "epsilon"
    if space == native:
        return torch.ones_like(alpha_bar)
    return 1.0 / alpha_bar if space == "v" else alpha_bar


def weighted_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    snr_gamma: float | None,
    loss_space: str | None = None,
) -> torch.Tensor:
    """Mean squared error, weighted per example by min(SNR, gamma) / SNR (v-prediction: / (SNR + 1)), or
    measured in ``loss_space`` ("epsilon" | "v", see :func:`loss_space_weights`; not with snr_gamma)."""
    if loss_space is not None:
        if snr_gamma is not None:
            raise ValueError("give a min-SNR gamma or a loss space, not both")
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        return (per_example * loss_space_weights(scheduler, timesteps, loss_space)).mean()
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_example * weights).mean()


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    snr_gamma: float | None = None,
    num_instance: int | None = None,
    prior_loss_weight: float = 1.0,
    loss_space: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its parts (detached, on the device: reading them is left to the caller).  With
    ``num_instance`` < batch the rest of the batch are class images (prior preservation):
    loss = instance loss + prior_loss_weight * plain MSE on the class images.
    ``loss_space`` ("epsilon" | "v"): measure the MSE in that space instead of min-SNR weighting."""
    if num_instance is None or num_instance >= pred.shape[0]:
        loss = weighted_mse(pred, target, timesteps, scheduler, snr_gamma, loss_space)
        return loss, {"loss": loss.detach()}
    inst = weighted_mse(pred[:num_instance], target[:num_instance], timesteps[:num_instance], scheduler, snr_gamma)
    prior = F.mse_loss(pred[num_instance:].float(), target[num_instance:].float(), reduction="mean")
    loss = inst + prior_loss_weight * prior
    return loss, {"loss": loss.detach(), "instance_loss": inst.detach(), "prior_loss": prior.detach()}
