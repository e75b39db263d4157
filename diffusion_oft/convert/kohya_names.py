"""kohya / LyCORIS names: key prefixes per component, module paths <-> kohya layer names, key parsing.

The tensors (LyCORIS's ``oft_blocks`` math, BOFT's stage layout) are ``convert.kohya``'s.
"""

from __future__ import annotations

import functools
import re

from torch import nn

from ..config import AdapterConfig
from ..files import AdapterFileError
from ..model import find_targets
from .common import ConversionError, linear_dims

# component -> key prefix (text_encoder becomes lora_te1 when a text_encoder_2 is present)
PREFIXES = {
    "unet": "lora_unet",
    "transformer": "lora_transformer",
    "text_encoder": "lora_te",
    "text_encoder_2": "lora_te2",
    "text_encoder_3": "lora_te3",
    "controlnet": "lora_controlnet",
}
# prefix -> component, longest first when matching
READ_PREFIXES = {
    "lora_unet": "unet",
    "lora_prior_unet": "unet",
    "oft_unet": "unet",  # kohya's original networks/oft.py
    "lycoris": "unet",  # LyCORIS's generic wrapper (create_lycoris)
    "lora_transformer": "transformer",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_te": "text_encoder",
    "lora_controlnet": "controlnet",
}
LYCORIS_PARAMS = ("oft_blocks", "alpha", "rescale")
PEFT_STYLE = ("oft_R.weight", "boft_R", "boft_s")

# Multi-word module names of diffusers / transformers models, to turn kohya names back into
# module paths when no model is at hand ('down_blocks_0_attentions_0' -> 'down_blocks.0.attentions.0').
_VOCAB = {
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "single_transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_in",
    "proj_out",
    "proj_mlp",
    "time_emb_proj",
    "conv_shortcut",
    "conv_in",
    "conv_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "ff_context",
    "norm_out",
    "time_text_embed",
    "context_embedder",
    "x_embedder",
    "norm_added_q",
    "norm_added_k",
    "add_embedding",
    "controlnet_down_blocks",
    "controlnet_mid_block",
    "text_projection",
}
_MAX_WORDS = max(len(v.split("_")) for v in _VOCAB)


def component_prefix(comp: str, components: list[str]) -> str:
    if comp == "text_encoder" and "text_encoder_2" in components:
        return "lora_te1"
    if comp not in PREFIXES:
        raise ConversionError(f"no kohya key prefix for component {comp!r}")
    return PREFIXES[comp]


_CLIP_ROOTS = ("encoder.", "embeddings.", "final_layer_norm")


def kohya_name(comp: str, path: str, components: list[str] | None = None) -> str:
    """The kohya module name of one layer, e.g. ``lora_unet_down_blocks_0_..._attn1_to_q``.

    Text encoders are named from ``text_model`` on (``lora_te_text_model_encoder_layers_0_...``), as
    ComfyUI and A1111 expect, also for transformers >= 5 whose CLIPTextModel dropped that level.
    """
    if comp.startswith("text_encoder") and path.startswith(_CLIP_ROOTS):
        path = "text_model." + path
    return f"{component_prefix(comp, components or [comp])}_{path.replace('.', '_')}"


@functools.cache
def _clip_has_text_model() -> bool:
    """Whether the installed transformers' CLIPTextModel nests its layers under ``text_model``."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:  # pragma: no cover
        return True
    config = CLIPTextConfig(
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        vocab_size=4,
        max_position_embeddings=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return any(name == "text_model" for name, _ in CLIPTextModel(config).named_children())


def kohya_key_names(model: nn.Module, config: AdapterConfig, component: str = "unet") -> list[str]:
    """Module names the kohya export of ``config`` on ``model`` uses (no adapter needed, works on
    the meta device)."""
    return sorted(kohya_name(component, t.path) for t in find_targets(model, config))


def guess_module_path(name: str) -> str:
    """kohya name (without prefix) -> module path, using the names diffusers/transformers use."""
    words = name.split("_")
    parts, i = [], 0
    while i < len(words):
        for j in range(min(len(words), i + _MAX_WORDS), i, -1):
            joined = "_".join(words[i:j])
            if j - i == 1 or joined in _VOCAB:
                parts.append(joined)
                i = j
                break
    return ".".join(parts)


def split_key(key: str) -> tuple[str, str, str] | None:
    """'lora_unet_a_b.oft_blocks' -> ('unet', 'a_b', 'oft_blocks'); None if no known prefix."""
    module, _, param = key.partition(".")
    for prefix in sorted(READ_PREFIXES, key=len, reverse=True):
        if module.startswith(prefix + "_"):
            return READ_PREFIXES[prefix], module[len(prefix) + 1 :], param
    return None


def is_kohya_key(key: str) -> bool:
    return split_key(key) is not None


def module_paths(modules: dict, model: nn.Module | None, comp: str, name: str) -> dict[str, str]:
    if model is None:
        paths = {m: guess_module_path(m) for m in modules}
        if comp.startswith("text_encoder") and not _clip_has_text_model():
            paths = {m: p.removeprefix("text_model.") for m, p in paths.items()}
        return paths
    lookup = {}
    for p in linear_dims(model):
        lookup[p.replace(".", "_")] = p
        if comp.startswith("text_encoder") and p.startswith(_CLIP_ROOTS):
            lookup["text_model_" + p.replace(".", "_")] = p
    paths = {}
    for m in modules:
        if m not in lookup:
            raise AdapterFileError(
                f"{name}: layer {m!r} ({comp}) is not a linear layer of this {type(model).__name__} "
                "(a file for another base model, or an adapter on convolutions, which diffusion-oft does not adapt)"
            )
        paths[m] = lookup[m]
    return paths


def is_lycoris_like(keys) -> bool:
    return any(re.search(r"\.(oft_blocks|oft_diag)$", k) for k in keys)
