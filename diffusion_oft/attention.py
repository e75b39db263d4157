"""Attention processors for adapted diffusers ``Attention`` modules.

The adapters live on the projections (``OrthoLinear``), not in the processor, so any processor
diffusers installs later (xformers, attention slicing, ``set_attn_processor``) still runs the
adapted projections.  ``OrthoAttnProcessor`` is diffusers' SDPA processor plus one optional
per-call keyword, ``ortho_scale`` (``cross_attention_kwargs={"ortho_scale": 0.5}``), which
multiplies every adapter's scale for that call.  (diffusers pops ``cross_attention_kwargs["scale"]``
for LoRA before processors see it, hence our own key.)
"""

from __future__ import annotations

import types

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .layers import OrthoLinear

try:  # diffusers >= 0.35: attention classes of the newer models (FluxAttention, ...) are not `Attention`
    from diffusers.models.attention import AttentionModuleMixin

    _ATTENTION_CLASSES: tuple[type, ...] = (Attention, AttentionModuleMixin)
except ImportError:  # pragma: no cover
    _ATTENTION_CLASSES = (Attention,)


class OrthoAttnProcessor(AttnProcessor2_0):
    """Scaled-dot-product attention with the adapted projections (behaves as AttnProcessor2_0)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ortho_scale: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if ortho_scale is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        layers = [m for m in attn.modules() if isinstance(m, OrthoLinear)]
        for layer in layers:
            layer.call_scale = float(ortho_scale)
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        finally:
            for layer in layers:
                layer.call_scale = None


def _has_unmerged_adapters(attn: torch.nn.Module) -> bool:
    return any(isinstance(m, OrthoLinear) and m._pending() for m in attn.modules())


def _guarded_fuse_projections(self: torch.nn.Module, *args, **kwargs) -> None:
    """Replacement of ``fuse_projections`` on adapted modules (``Attention``'s takes ``fuse=True``,
    ``AttentionModuleMixin``'s, e.g. FluxAttention's, nothing): fusing would copy the frozen weights
    without the adapters, so it is allowed only once they are merged."""
    fuse = args[0] if args else kwargs.get("fuse", True)
    if fuse and _has_unmerged_adapters(self):
        raise RuntimeError(
            "fuse_qkv_projections() would drop the orthogonal adapters on this attention module; "
            "call diffusion_oft.merge_adapter(model) first (or don't fuse)"
        )
    type(self).fuse_projections(self, *args, **kwargs)


def install_processors(model: torch.nn.Module) -> None:
    """Put OrthoAttnProcessor on every Attention module that runs diffusers' default SDPA processor
    (others, e.g. IP-Adapter or user processors, are kept: the adapters still apply through the
    projections) and guard fuse_projections on adapted ones."""
    for module in model.modules():
        if not isinstance(module, _ATTENTION_CLASSES):
            continue
        if isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0:
            module.set_processor(OrthoAttnProcessor())
        if any(isinstance(m, OrthoLinear) for m in module.modules()):
            if getattr(module, "fused_projections", False):
                raise RuntimeError(
                    "this model's QKV projections are fused; call unfuse_qkv_projections() before adding adapters"
                )
            module.fuse_projections = types.MethodType(_guarded_fuse_projections, module)


def uninstall_processors(model: torch.nn.Module) -> None:
    """Back to diffusers' stock SDPA processor; remove the fuse guard."""
    for module in model.modules():
        if not isinstance(module, _ATTENTION_CLASSES):
            continue
        if isinstance(module.processor, OrthoAttnProcessor):
            module.set_processor(AttnProcessor2_0())
        if "fuse_projections" in module.__dict__ and not any(isinstance(m, OrthoLinear) for m in module.modules()):
            del module.__dict__["fuse_projections"]
