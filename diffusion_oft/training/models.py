"""Base-model components for training: loading (SD 1.x/2.x and SDXL), prompt encoding, pipelines."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..files import one_line
from ..model_paths import BUILTIN_MODELS, looks_like_a_path, resolve_model_path  # noqa: F401 (re-exported)


@dataclass
class BaseModel:
    """The components of a Stable Diffusion (or SDXL) base model, loaded separately for training."""

    name_or_path: str
    unet: nn.Module
    vae: nn.Module
    noise_scheduler: object
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2 or getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]


def _text_encoder_class(name_or_path: str, revision: str | None, subfolder: str):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(name_or_path, subfolder=subfolder, revision=revision)
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch == "CLIPTextModel":
        return CLIPTextModel
    if arch == "CLIPTextModelWithProjection":
        return CLIPTextModelWithProjection
    raise ValueError(f"{name_or_path}/{subfolder}: text encoder {arch} is not supported (CLIP text models only)")


def load_base_model(args) -> BaseModel:
    """Load tokenizer(s), text encoder(s), VAE, UNet and the DDPM noise scheduler."""
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    path, rev, variant = resolve_model_path(args.pretrained_model_name_or_path), args.revision, args.variant
    local = Path(path)
    if local.exists() and not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
        raise ValueError(f"--pretrained_model_name_or_path {path}: not a diffusers model folder (no model_index.json)")
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=variant)
    except OSError as err:
        raise ValueError(f"cannot load the base model {path!r}: {one_line(err, first=True)}") from None
    vae_path = args.pretrained_vae_model_name_or_path
    vae = AutoencoderKL.from_pretrained(
        vae_path or path,
        subfolder=None if vae_path else "vae",
        revision=None if vae_path else rev,
        variant=None if vae_path else variant,
    )
    tokenizers, text_encoders = [], []
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    for sub_tok, sub_enc in [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")][: 2 if sdxl else 1]:
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=sub_tok, revision=rev, use_fast=False))
        cls = _text_encoder_class(path, rev, sub_enc)
        text_encoders.append(cls.from_pretrained(path, subfolder=sub_enc, revision=rev, variant=variant))
    for module in [unet, vae, *text_encoders]:
        module.requires_grad_(False)
    return BaseModel(path, unet, vae, noise_scheduler, tokenizers, text_encoders)


def to_device(module: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """Move a module; cast only when the dtype changes (diffusers warns on no-op casts)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)
    return module


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(
    base: BaseModel, prompts: list[str], text_encoders: list[nn.Module] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds, pooled_embeds): SD -> last hidden state, None; SDXL -> the two encoders'
    penultimate hidden states concatenated, and the second encoder's pooled projection."""
    encoders = text_encoders or base.text_encoders
    device = next(encoders[0].parameters()).device
    if not base.is_sdxl:
        return encoders[0](tokenize(base.tokenizers[0], prompts).to(device))[0], None
    embeds, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, encoders, strict=True):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


@torch.no_grad()
def encode_prompts_cached(
    base: BaseModel, prompts: list[str], cache: dict[str, tuple], limit: int = 4096
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """encode_prompts with frozen text encoders, one cached entry per distinct prompt (so per-image
    captions cost one encoder pass each, not one per step); the cache is cleared past ``limit``."""
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        if len(cache) + len(missing) > limit:
            cache.clear()
            missing = list(dict.fromkeys(prompts))
        embeds, pooled = encode_prompts(base, missing)
        for i, prompt in enumerate(missing):
            cache[prompt] = (embeds[i : i + 1], None if pooled is None else pooled[i : i + 1])
    embeds = torch.cat([cache[p][0] for p in prompts])
    pooled = None if cache[prompts[0]][1] is None else torch.cat([cache[p][1] for p in prompts])
    return embeds, pooled


def sdxl_time_ids(original_sizes, crop_top_lefts, resolution: int, device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning: (orig h, orig w, crop top, crop left, target h, target w) per image."""
    rows = [list(o) + list(c) + [resolution, resolution] for o, c in zip(original_sizes, crop_top_lefts, strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)


def inference_pipeline(base: BaseModel, unet: nn.Module | None = None, text_encoders: list | None = None):
    """A text-to-image pipeline around the (possibly adapted) components, with a DPM-Solver scheduler."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config)
    unet = unet or base.unet
    encoders = text_encoders or base.text_encoders
    if base.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=base.vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=encoders[0],
            tokenizer=base.tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
