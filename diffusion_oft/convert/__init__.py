"""Converters between diffusion-oft adapters and the formats other tools read.

* ``peft``: PEFT OFT / BOFT adapter folders (input side), both ways.
* ``kohya``: kohya / LyCORIS ``oft_blocks`` files for ComfyUI / A1111 (output side), both ways;
  kohya's newer PEFT-style ``oft_R.weight`` / ``boft_R`` files are read too.
* ``diff``: full weight deltas per adapted layer (``<kohya name>.diff``), any method, exact.
* ``merged``: a diffusers model or pipeline folder with the adapter folded into the weights.
* ``lora`` / ``kohya-lora``: the weight change as a LoRA (diffusers' / kohya's layout), exact for
  ETHER / ETHER+, a truncated SVD for OFT / BOFT (``rank`` / ``max_error``); needs the base model.

``read_adapter(path)`` detects the format from the keys; it is registered as a reader of
``diffusion_oft.files`` (``register_reader``), so ``load_adapter`` loads PEFT and kohya/LyCORIS files directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..files import (
    COMPONENT_NAMES,
    FORMAT_NAME,
    AdapterFileError,
    is_pipeline,
    pipeline_components,
    read_adapter_file,
    register_reader,
)
from ..methods import METHOD_REGISTRY
from .common import (
    ConversionError,
    ConversionWarning,
    NativeAdapter,
    linear_dims,
    load_native,
    read_native,
    save_native,
)
from .full import write_diff, write_merged
from .kohya import kohya_to_native, write_kohya
from .kohya_names import is_kohya_key, kohya_key_names, kohya_name
from .lora import lora_layout, lora_refusal, write_lora
from .peft import WEIGHTS_NAME, is_peft_key, native_to_peft, peft_to_native, read_peft

__all__ = [
    "ConversionError",
    "ConversionWarning",
    "NativeAdapter",
    "FORMATS",
    "convert",
    "detect_format",
    "kohya_key_names",
    "kohya_name",
    "load_native",
    "read_adapter",
]

FORMATS = ("peft", "kohya", "diff", "merged", "lora", "kohya-lora", "diffusion-oft")
NEEDS_MODEL = ("diff", "merged", "lora", "kohya-lora")


def detect_format(keys, metadata: dict[str, str] | None = None) -> str:
    """'diffusion-oft', 'peft' or 'kohya' from a file's keys (and metadata); AdapterFileError otherwise."""
    keys = list(keys)
    if (metadata or {}).get("format") == FORMAT_NAME:
        return "diffusion-oft"
    if not keys:
        raise AdapterFileError("the file holds no tensors")
    layout = lora_layout(keys)
    if layout is not None:
        raise AdapterFileError(lora_refusal(layout))
    if all(is_kohya_key(k) for k in keys):
        return "kohya"
    if all(is_peft_key(k) for k in keys):
        return "peft"
    sample = next((k for k in keys if not is_kohya_key(k) and not is_peft_key(k)), keys[0])
    hint = ""
    ours = {"magnitude"}.union(*(cls.tensor_names for cls in METHOD_REGISTRY.values()))
    if sample.rpartition(".")[2] in ours:
        hint = " (diffusion-oft tensor names, but the file's metadata is missing)"
    raise AdapterFileError(
        f"not a diffusion-oft adapter, nor a PEFT or kohya/LyCORIS OFT/BOFT file: key {sample!r}{hint}"
    )


def _candidates(target: Any, component: str | None) -> dict[str, nn.Module] | None:
    """The models an adapter file may be for: a pipeline's adapter-carrying kinds of component, in
    ``COMPONENT_NAMES`` order (``files.pipeline_components``), or the one model."""
    if target is None:
        return None
    found = pipeline_components(target, component, adapted=False)
    if not is_pipeline(target):
        return found
    return {c: m for kind in COMPONENT_NAMES for c, m in found.items() if c == kind or c.startswith(kind + ".nets.")}


def read_adapter(path: str | os.PathLike, target: Any = None, component: str | None = None) -> NativeAdapter:
    """Any supported adapter (file, or PEFT folder) -> NativeAdapter.

    target: the model or pipeline the adapter is for, when at hand; it maps kohya names to module
    paths exactly, picks the component of PEFT files and supplies layer sizes.
    """
    path = Path(path)
    name = path.name
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            if (path / "pytorch_lora_weights.safetensors").is_file():
                raise AdapterFileError(f"{path}: {lora_refusal('diffusers')}")
            raise AdapterFileError(f"{path}: a folder, but not a PEFT adapter folder (no {WEIGHTS_NAME})")
        tensors, peft_config, _ = read_peft(path)
        return peft_to_native(tensors, peft_config, name, _candidates(target, component))
    tensors, metadata = read_adapter_file(path)
    try:
        fmt = detect_format(tensors, metadata)
    except AdapterFileError as err:
        raise AdapterFileError(f"{name}: {err}") from None
    if fmt == "diffusion-oft":
        return read_native(path)
    if fmt == "peft":
        tensors, peft_config, _ = read_peft(path)
        return peft_to_native(tensors, peft_config, name, _candidates(target, component))
    only = component if target is not None and not is_pipeline(target) else None
    return kohya_to_native(tensors, metadata, name, _candidates(target, component), only)


def _layer_dims(target: Any, native: NativeAdapter) -> dict[str, dict[str, tuple[int, int]]]:
    if target is None:
        return {}
    if is_pipeline(target):
        comps = [c for c in native.configs if isinstance(getattr(target, c, None), nn.Module)]
        return {c: linear_dims(getattr(target, c)) for c in comps}
    return {c: linear_dims(target) for c in native.configs}


@register_reader
def _read_for_loading(path: Path, target: Any, component: str | None) -> tuple[dict, dict]:
    """``load_adapter``'s reader of PEFT / kohya / LyCORIS adapters (see ``files.FOREIGN_READERS``)."""
    native = read_adapter(path, target, component)
    return native.tensors, native.configs


def convert(
    src: str | os.PathLike,
    to: str,
    dst: str | os.PathLike,
    model: str | os.PathLike | Any | None = None,
    dtype: str = "auto",
    rank: int | None = None,
    max_error: float | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert an adapter (any readable format) to ``to`` in ``dst``.

    model: the base model (a diffusers pipeline / model folder or hub id, or a loaded pipeline /
    model); needed for ``diff``, ``merged``, ``lora`` and ``kohya-lora``, optional otherwise (exact
    kohya names, layer sizes).  rank / max_error: LoRA exports only (see ``convert.lora``); log
    receives their per-layer-group summary.
    """
    if to not in FORMATS:
        raise ConversionError(f"unknown target format {to!r}; choose from {', '.join(FORMATS)}")
    target = model
    if isinstance(model, (str, os.PathLike)) and to != "merged":
        from .full import load_base

        target = load_base(model, read_adapter(src))
    native = read_adapter(src, target)
    if to == "peft":
        native_to_peft(native, dst, _layer_dims(target, native))
        return Path(dst)
    if to == "kohya":
        return write_kohya(native, dst)
    if to == "diffusion-oft":
        return save_native(native.tensors, native.configs, dst, native.base_model)
    if model is None:
        raise ConversionError(f"--to {to} needs the base model (--model PATH_OR_HUB_ID)")
    if to in ("lora", "kohya-lora"):
        layout = "diffusers" if to == "lora" else "kohya"
        base_name = str(model) if isinstance(model, (str, os.PathLike)) else None
        out, text = write_lora(native, target, dst, layout, rank, max_error, base_name)
        if log is not None:
            log(text)
        return out
    if to == "diff":
        return write_diff(native, target, dst, dtype)
    if not isinstance(model, (str, os.PathLike)):
        raise ConversionError("--to merged takes the base model's folder or hub id (it saves a full copy)")
    return write_merged(native, model, dst)
