"""The neutral form every converter reads and writes: our own adapter file's content.

``NativeAdapter`` holds, per component (``unet``, ``text_encoder``, ...), one ``AdapterConfig`` and
the adapter tensors keyed ``<component>.<module path>.<parameter>``, exactly as a diffusion-oft
file stores them.  Importers (PEFT, kohya/LyCORIS) produce it; exporters consume it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig
from ..files import (
    AdapterFileError,
    is_pipeline,
    load_tensors,
    parse_metadata,
    read_adapter_file,
    write_adapter_file,
)
from ..model import find_targets


class ConversionError(ValueError):
    """An adapter that cannot be converted to the requested format (one-line reason)."""


class ConversionWarning(UserWarning):
    """A conversion that works but has a caveat the user should know about."""


def warn(message: str) -> None:
    warnings.warn(message, ConversionWarning, stacklevel=3)


@dataclass
class NativeAdapter:
    """Configs and tensors of one adapter, in diffusion-oft's own layout."""

    configs: dict[str, AdapterConfig]
    tensors: dict[str, torch.Tensor]
    source_format: str = "diffusion-oft"
    base_model: dict[str, dict] = field(default_factory=dict)

    def layers(self, component: str) -> dict[str, dict[str, torch.Tensor]]:
        """{module path: {parameter name: tensor}} of one component."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        prefix = component + "."
        for key, tensor in self.tensors.items():
            if key.startswith(prefix):
                path, _, pname = key[len(prefix) :].rpartition(".")
                out.setdefault(path, {})[pname] = tensor
        return dict(sorted(out.items()))


def read_native(path: str | os.PathLike) -> NativeAdapter:
    tensors, metadata = read_adapter_file(path)
    configs = parse_metadata(metadata, Path(path).name)
    base = json.loads(metadata.get("base_model", "{}") or "{}")
    return NativeAdapter(configs, {k: v.float() for k, v in tensors.items()}, "diffusion-oft", base)


# ---- structure inference --------------------------------------------------------------------------


def structure_fields(shapes: dict[str, tuple[int, int]], what: str) -> dict[str, int]:
    """AdapterConfig structure (``block_size`` or ``num_blocks``) from per-layer (n, b).

    One config must describe every layer: a common block size, else a common block count.
    """
    sizes = {b for _, b in shapes.values()}
    counts = {n for n, _ in shapes.values()}
    if len(sizes) == 1:
        return {"block_size": sizes.pop()}
    if len(counts) == 1:
        return {"num_blocks": counts.pop()}
    example = ", ".join(f"{p}: {n} blocks of {b}" for p, (n, b) in list(shapes.items())[:3])
    raise ConversionError(
        f"{what}: the layers use different block sizes and block counts ({example}, ...), which one "
        "diffusion-oft config cannot describe; retrain with a block size that divides every layer evenly"
    )


def _suffix(path: str) -> str:
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("attn") or parts[i] in ("self_attn", "attention"):
            return ".".join(parts[i + 1 :])
    if len(parts) >= 2 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]


def target_fields(paths: list[str], config_kwargs: dict, module: nn.Module | None = None) -> dict:
    """``target_modules`` / ``attention`` that select exactly ``paths``.

    With the model at hand the compact suffix form (``to_q``, ``to_out.0``, ...) is used when it
    selects exactly these modules; otherwise the full module paths are listed (always exact).
    """
    wanted = set(paths)
    if module is not None:
        suffixes = tuple(sorted({_suffix(p) for p in paths}))
        for attention in ("all", "self", "cross"):
            try:
                cfg = AdapterConfig(**config_kwargs, target_modules=suffixes, attention=attention)
            except ValueError:
                break
            if {t.path for t in find_targets(module, cfg)} == wanted:
                return {"target_modules": suffixes, "attention": attention}
    return {"target_modules": tuple(sorted(wanted)), "attention": "all"}


def linear_dims(module: nn.Module) -> dict[str, tuple[int, int]]:
    """{module path: (in_features, out_features)} of the linear layers (adapted or not)."""
    dims = {}
    for path, sub in module.named_modules():
        if path.endswith(".base_layer"):
            continue
        if isinstance(sub, nn.Linear) or hasattr(sub, "ortho_adapters"):
            dims[path] = (sub.in_features, sub.out_features)
    return dims


def resolve_component(paths: list[str], candidates: dict[str, nn.Module], what: str) -> str:
    """The component (of a pipeline) whose modules contain every path."""
    for comp, module in candidates.items():
        names = set(linear_dims(module))
        if all(p in names for p in paths):
            return comp
    raise AdapterFileError(
        f"{what}: no component of the target has the modules this adapter is for "
        f"(e.g. {paths[0]!r}); a file for another base model?"
    )


def save_native(
    tensors: dict[str, torch.Tensor],
    configs: dict[str, AdapterConfig],
    path: str | os.PathLike,
    base_model: dict[str, dict] | None = None,
) -> Path:
    """Write tensors + configs as a diffusion-oft adapter file (``files.write_adapter_file``, the writer
    of ``save_adapter``), with each component's layer count in its base-model hints."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"adapter files are .safetensors; got {path.name!r}")
    base = {}
    for comp in configs:
        keys = [k for k in tensors if k.startswith(comp + ".")]
        base[comp] = {**(base_model or {}).get(comp, {}), "num_layers": len({k.rsplit(".", 1)[0] for k in keys})}
    return write_adapter_file(tensors, configs, base, path)


def load_native(target: Any, native: NativeAdapter, adapter_name: str = "default", component: str | None = None):
    """Load a NativeAdapter into a pipeline or model (validated before anything changes)."""
    configs = dict(native.configs)
    if not is_pipeline(target) and len(configs) == 1 and component is None:
        component = next(iter(configs))
    return load_tensors(target, native.tensors, configs, f"{native.source_format} adapter", adapter_name, component)
