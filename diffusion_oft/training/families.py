"""Model families of the DreamBooth trainer, detected from the model folder (``model_index.json``).

A family knows what differs between base models: how prompts become the transformer's conditioning,
how latents are laid out for it, what it is called with, which pipeline renders its images and its
defaults.  Stable Diffusion 1.x / 2.x / SDXL (UNet, ε / v targets) keep the SD trainer
(``training/dreambooth.py``); the flow-matching DiT families (SD3 / SD3.5, FLUX.1 dev and schnell) are
:class:`SD3Family` and :class:`FluxFamily`, trained by ``training/dit.py`` with one step function.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..model_paths import resolve_model_path

# Flux's single blocks share one output projection between attention and MLP; its suffix "proj_out" also
# names the transformer's final projection, so the feed-forward preset lists the single blocks' by path.
SINGLE_BLOCKS = "single_transformer_blocks"


def pipeline_class_name(name_or_path: str, revision: str | None = None) -> str | None:
    """``_class_name`` of the model's ``model_index.json`` (builtin names resolved), or None when it
    cannot be read (no index: the SD loader then reports what is wrong)."""
    path = resolve_model_path(name_or_path)
    local = Path(path).expanduser()
    try:
        if local.exists():
            index = local / "model_index.json"
            return json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path, revision=revision).get("_class_name")
    except (OSError, ValueError):
        return None


class FlowFamily:
    """A flow-matching DiT model family (rectified flow: x_σ = (1 − σ)x + σε, velocity target ε − x)."""

    name = "flow"
    pipeline_classes: tuple[str, ...] = ()
    default_weighting_scheme = "none"
    default_guidance_scale = 7.0
    default_max_sequence_length = 256
    hub_tags: tuple[str, ...] = ()

    def load_pipeline(self, path: str, revision: str | None, variant: str | None):
        import diffusers

        cls = getattr(diffusers, self.pipeline_classes[0])
        try:
            pipe = cls.from_pretrained(path, revision=revision, variant=variant)
        except OSError as err:
            raise ValueError(f"cannot load the base model {path!r}: {str(err).splitlines()[0]}") from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def text_encoders(self, pipe) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]

    def check_resolution(self, pipe, resolution: int) -> None:
        """Raise (one line) when the latents of ``resolution`` pixels do not split into the model's patches."""
        step = pipe.vae_scale_factor * self.latent_multiple(pipe)
        if resolution % step:
            lo, hi = resolution // step * step, resolution // step * step + step
            raise ValueError(
                f"--resolution must be divisible by {step} for this {type(pipe).__name__}, "
                f"got {resolution} (try {lo or hi} or {hi})"
            )

    def latent_multiple(self, pipe) -> int:
        raise NotImplementedError

    def encode_prompts(self, pipe, prompts: list[str], max_sequence_length: int, device) -> dict[str, torch.Tensor]:
        """The transformer's text conditioning for ``prompts`` (frozen text encoders), one row per prompt."""
        raise NotImplementedError

    def predict(
        self,
        transformer: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        guidance_scale: float,
    ) -> torch.Tensor:
        """The velocity the transformer predicts for ``noisy`` (B, C, h, w) at ``timesteps`` (B,) on the
        scheduler's 0..1000 scale, in the latents' (B, C, h, w) layout."""
        raise NotImplementedError

    def transformer_kwargs(self, transformer: nn.Module, batch: int, guidance_scale: float, device) -> dict:
        return {}


class SD3Family(FlowFamily):
    """SD3 / SD3.5 (MMDiT): CLIP-L + CLIP-G + T5 text, latents (x − shift)·scale in (B, 16, h, w)."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    default_weighting_scheme = "logit_normal"  # diffusers' SD3 DreamBooth scripts
    default_guidance_scale = 7.0  # StableDiffusion3Pipeline's
    default_max_sequence_length = 77  # diffusers' SD3 DreamBooth scripts
    hub_tags = ("sd3", "sd3-diffusers")

    def latent_multiple(self, pipe) -> int:
        return pipe.transformer.config.patch_size

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, max_sequence_length, device):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}  # (B, 77 + L, 4096), (B, 2048)

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale):
        return transformer(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 · w/2, 4C): Flux's 2×2 patches as tokens (row-major, channels then 2×2)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` × ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h/2 · w/2, 3) position ids of the packed tokens: (0, row, column)."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(device=device, dtype=dtype)


class FluxFamily(FlowFamily):
    """FLUX.1 dev / schnell: CLIP pooled + T5 text, latents packed 2×2 with image / text ids, timestep / 1000,
    the guidance embedding fed ``guidance_scale`` where the transformer has one (dev; ``guidance_embeds``)."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    default_weighting_scheme = "none"  # diffusers' Flux DreamBooth scripts
    default_guidance_scale = 3.5  # FLUX.1-dev's guidance embedding (diffusers' scripts and pipeline)
    default_max_sequence_length = 512  # diffusers' Flux DreamBooth scripts
    hub_tags = ("flux", "flux-diffusers")

    def latent_multiple(self, pipe) -> int:
        return 2  # 2x2 packing

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, max_sequence_length, device):
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompts, None, device=device, max_sequence_length=max_sequence_length
        )
        # (B, L, 4096), (B, 768), (L, 3): the text ids are the same for every row
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def transformer_kwargs(self, transformer, batch, guidance_scale, device):
        from .flow import flux_guidance

        model = getattr(transformer, "module", transformer)  # DDP-wrapped under accelerate launch: its config
        guidance = flux_guidance(model, guidance_scale, batch, device=device)
        return {} if guidance is None else {"guidance": guidance}

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale):
        b, _, h, w = noisy.shape
        kwargs = self.transformer_kwargs(transformer, b, guidance_scale, noisy.device)
        pred = transformer(
            hidden_states=pack_latents(noisy),
            timestep=timesteps / 1000,
            img_ids=latent_image_ids(h, w, noisy.device, noisy.dtype),
            return_dict=False,
            **cond,
            **kwargs,
        )[0]
        return unpack_latents(pred, h, w)


FAMILIES: tuple[FlowFamily, ...] = (SD3Family(), FluxFamily())


def family_named(name: str) -> FlowFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def flow_family(name_or_path: str, revision: str | None = None) -> FlowFamily | None:
    """The DiT family of a model folder / hub id / builtin name, or None (Stable Diffusion, or unknown)."""
    cls_name = pipeline_class_name(name_or_path, revision)
    return next((f for f in FAMILIES if cls_name in f.pipeline_classes), None)


def feed_forward_targets(transformer: nn.Module) -> tuple[str, ...]:
    """The feed-forward layers of a DiT for ``extra_target_modules``: the joint blocks' image and text MLPs
    (DIT_FEED_FORWARD_TARGETS) and, for Flux, every single block's ``proj_out`` by its path."""
    from ..config import DIT_FEED_FORWARD_TARGETS

    singles = getattr(transformer, SINGLE_BLOCKS, None) or []
    return DIT_FEED_FORWARD_TARGETS + tuple(f"{SINGLE_BLOCKS}.{i}.proj_out" for i in range(len(singles)))
