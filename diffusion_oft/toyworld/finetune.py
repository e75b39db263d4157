"""One small finetuning loop for the quality benchmark: the same loop, data, steps and evaluation for
every adapter — ours (OFT, BOFT, ETHER, ETHER+) and PEFT's LoRA as the reference — so the only
difference between rows is the adapter.

The user-facing trainers are ``diffusion-oft train dreambooth|control``; this loop is their minimal
core (diffusion loss with min-SNR-5, AdamW, fixed seed) without files, checkpoints or accelerate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import AdapterConfig
from ..model import add_adapter, count_adapter_parameters
from ..training.loss import diffusion_loss, sample_noise, sample_timesteps, training_target
from . import world

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class AdapterSpec:
    """An adapter of the benchmark: ``config`` for ours, or ``lora_rank`` for PEFT LoRA."""

    name: str
    config: AdapterConfig | None = None
    lora_rank: int | None = None
    full: bool = False  # full finetuning of the UNet (the reference row): no adapter
    lora_targets: tuple[str, ...] = tuple(TARGETS)  # PEFT LoRA's target_modules

    def attach(self, unet: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Add the adapter to a frozen UNet; returns its trainable parameters."""
        if self.full:
            return list(unet.requires_grad_(True).parameters())
        if self.config is not None:
            add_adapter(unet, self.config)
        else:
            from peft import LoraConfig

            unet.add_adapter(
                LoraConfig(
                    r=self.lora_rank,
                    lora_alpha=self.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(self.lora_targets),
                )
            )
        return [p for p in unet.parameters() if p.requires_grad]

    def trainable_count(self, unet: torch.nn.Module) -> int:
        if self.full:
            return sum(p.numel() for p in unet.parameters())
        if self.config is not None:
            return count_adapter_parameters(unet)
        return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


def load_toy_pipeline(model_dir: str | Path, control: bool = False):
    """The toy model as a (control) pipeline, frozen, in eval mode."""
    from diffusers import StableDiffusionPipeline

    from ..pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

    cls = OrthoStableDiffusionControlPipeline if control else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    return pipe


def pixels_of(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((world.IMAGE_SIZE, world.IMAGE_SIZE))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode(pipe, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return latents, pipe.text_encoder(ids)[0]


class ControlNetPipe:
    """A ``StableDiffusionControlNetPipeline`` around the toy pipeline's parts and ``controlnet``, called
    like the control pipeline (``image=``, ``control_scale=``) so the control evaluation judges both."""

    def __init__(self, pipe, controlnet: torch.nn.Module):
        from diffusers import StableDiffusionControlNetPipeline

        self.vae = pipe.vae
        self.pipe = StableDiffusionControlNetPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            controlnet=controlnet,
            scheduler=pipe.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, prompt, image, control_scale: float = 1.0, **kwargs):
        return self.pipe(prompt, image=image, controlnet_conditioning_scale=control_scale, **kwargs)


def train(
    pipe,
    spec: AdapterSpec | None,
    latents,
    text,
    *,
    steps: int,
    lr: float,
    batch_size: int = 4,
    seed: int = 0,
    conditions: torch.Tensor | None = None,
    encoder: torch.nn.Module | None = None,
    controlnet: torch.nn.Module | None = None,
    encoder_lr: float = 1e-3,
    timestep_bias: str | None = None,
    loss_space: str | None = None,
    max_grad_norm: float | None = None,
    on_step=None,
) -> dict:
    """Train ``spec``'s adapter on (latents, text embeddings[, conditions]).  Returns params/time/losses.

    Control: with an ``encoder``, the adapter goes on the UNet and the encoder's features are added
    to it (``diffusion-oft train control``'s default mode); with a ``controlnet`` (diffusers'
    ``ControlNetModel``), its residuals feed the frozen UNet and the adapter goes on the ControlNet's
    attention, whose hint encoder and zero convs train in full at ``encoder_lr`` (``--control_mode
    controlnet``), or, with ``spec=None``, every ControlNet parameter trains (the ControlNet paper's
    setup): the copied UNet's at ``lr``, the new hint encoder and zero convs at ``encoder_lr``.  Loss:
    min-SNR-5 on uniform timesteps; for control by default the control recipe of ``diffusion-oft train
    control``: cubic timestep bias and the v-space MSE.  With ``max_grad_norm`` gradients are clipped
    to that norm (the trainers' and diffusers' scripts' default is 1.0); ``on_step(step)`` is
    called after each optimiser step (1-based), e.g. to keep checkpoints."""
    is_control = encoder is not None or controlnet is not None
    if is_control:
        timestep_bias = timestep_bias or "cubic"
        loss_space = loss_space or "v"
    timestep_bias = timestep_bias or "none"
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    control, extra = None, []
    if controlnet is not None:
        from ..training.control import CONTROLNET_TRAINED_PARTS, ControlNetUNet

        controlnet.requires_grad_(spec is None)
        if spec is not None:
            params = spec.attach(controlnet)
            for part in CONTROLNET_TRAINED_PARTS:
                extra += list(getattr(controlnet, part).requires_grad_(True).parameters())
        else:  # every parameter; the new hint encoder and zero convs at encoder_lr, as in the other rows
            fresh = {id(p) for part in CONTROLNET_TRAINED_PARTS for p in getattr(controlnet, part).parameters()}
            params = [p for p in controlnet.parameters() if id(p) not in fresh]
            extra = [p for p in controlnet.parameters() if id(p) in fresh]
        control = ControlNetUNet(pipe.unet, controlnet)
        trained = controlnet
    else:
        params = spec.attach(pipe.unet)
        trained = pipe.unet
    groups = [{"params": params, "lr": lr}]
    if encoder is not None:
        from ..control import ControlledUNet

        control = ControlledUNet(pipe.unet, encoder)
        extra = list(encoder.parameters())
    if extra:
        groups.append({"params": extra, "lr": encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    trained.train()
    clipped = [p for group in groups for p in group["params"]]
    losses, norms, start = [], [], time.time()
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        x0 = latents[idx]
        noise = sample_noise(x0, g)
        t = sample_timesteps(batch_size, scheduler, g, x0.device, timestep_bias)
        noisy = scheduler.add_noise(x0, noise, t)
        if control is not None:
            pred = control(noisy, t, text[idx], conditions[idx]).sample
        else:
            pred = pipe.unet(noisy, t, text[idx]).sample
        loss, _ = diffusion_loss(
            pred,
            training_target(scheduler, x0, noise, t),
            t,
            scheduler,
            snr_gamma=None if loss_space else 5.0,
            loss_space=loss_space,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            norms.append(float(torch.nn.utils.clip_grad_norm_(clipped, max_grad_norm)))
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses))
    trained.eval()
    if encoder is not None:
        pipe.set_condition_encoder(encoder)
    n_params = sum(p.numel() for p in params) if spec is None else spec.trainable_count(trained)
    n_extra = sum(p.numel() for p in extra)
    return {
        "params": n_params + n_extra,
        "adapter_params": n_params + n_extra if spec is None else n_params,  # full ControlNet: all of it
        "seconds": time.time() - start,
        "first_loss": float(np.mean(losses[:20])),
        "last_loss": float(np.mean(losses[-20:])),
        # gradient norms before clipping (median, largest, share of steps clipped); None without clipping
        "grad_norm": (
            (float(np.median(norms)), max(norms), float(np.mean(np.asarray(norms) > max_grad_norm))) if norms else None
        ),
    }
