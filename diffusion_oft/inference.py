"""Adapters at inference time: several named adapters on a whole pipeline, scales, merging.

Every function takes a diffusers pipeline *or* a single model.  On a pipeline it acts on each
component that carries adapters (UNet / transformer, ControlNet, text encoders), so an adapter
file that adapted several components is switched, scaled, merged and removed as one unit.

Composition: the active adapters apply in the order given to :func:`set_adapters` (default: the
order they were loaded).  On the input side a layer's weight becomes ``W·R₁ᵀ·R₂ᵀ = W·(R₂R₁)ᵀ``,
and a product of orthogonal matrices is orthogonal, so composing OFT / BOFT / ETHER adapters keeps
the angles between the pretrained neurons.

Scale ``s`` per adapter (``set_adapters(pipe, names, weights)``; ``0`` is always the base model,
``1`` the trained adapter):

* OFT / BOFT: ``R(s) = Cayley(s·S)`` for every block (and every butterfly factor).  ``s·S`` is
  still skew-symmetric, so ``R(s)`` is orthogonal for *every* ``s``; ``s > 1`` extrapolates along
  the same path.  For OFT ``s = −1`` gives ``R⁻¹ = Rᵀ``; for BOFT it inverts each factor (the
  product ``B₂ᵀB₁ᵀ`` is not ``(B₂B₁)ᵀ``).
* ETHER: ``H(s) = I − 2s·ûûᵀ``: the identity at 0, the trained reflection at 1, orthogonal only
  at those two points (in between it shrinks the ``û`` direction by ``1 − 2s``).
* ETHER+: ``H⁺(s) = I − s·ûûᵀ + s·v̂v̂ᵀ`` on each side: a straight line from the identity to the
  trained transform (ETHER+ is not orthogonal at any ``s`` in general).

A learned ``magnitude`` (``AdapterConfig(magnitude=True)``) is applied as trained whatever the
scale; scale 0 of such an adapter is therefore not the base model.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import model as _model
from .files import is_pipeline, load_adapter, pipeline_components
from .layers import OrthoLinear
from .methods import METHOD_REGISTRY, get_method_class
from .model import adapter_configs, ortho_layers

__all__ = [
    "active_adapters",
    "adapted_components",
    "adapter_name_from_path",
    "adapter_names",
    "load_adapters",
    "merge_adapter",
    "remove_adapter",
    "set_adapter_enabled",
    "set_adapters",
    "unmerge_adapter",
    "use_adapters",
]


def adapted_components(pipeline_or_model: Any) -> dict[str, nn.Module]:
    """{component name: model} of the parts that carry orthogonal adapters (``files.pipeline_components``:
    a MultiControlNetModel's nets are ``controlnet.nets.<i>``)."""
    return pipeline_components(pipeline_or_model)


def _require(pipeline_or_model: Any) -> dict[str, nn.Module]:
    components = adapted_components(pipeline_or_model)
    if not components:
        raise ValueError(
            f"{type(pipeline_or_model).__name__} carries no orthogonal adapter (load one with load_adapter)"
        )
    return components


def adapter_names(pipeline_or_model: Any) -> list[str]:
    """Names of all adapters present (active or not), in the order they were added."""
    names: list[str] = []
    for module in adapted_components(pipeline_or_model).values():
        names += [n for n in adapter_configs(module) if n not in names]
    return names


def active_adapters(pipeline_or_model: Any) -> dict[str, float]:
    """{name: scale} of the adapters that currently apply, in composition order ({} when disabled)."""
    active: dict[str, float] = {}
    for module in adapted_components(pipeline_or_model).values():
        for layer in ortho_layers(module):
            if not layer.adapters_enabled:
                continue
            for name in layer.active_adapters:
                active.setdefault(name, layer.adapter_scales.get(name, 1.0))
    return active


def _merged_layers(components: dict[str, nn.Module]) -> list[OrthoLinear]:
    return [layer for module in components.values() for layer in ortho_layers(module) if layer.merged_adapters]


def _refuse_if_merged(components: dict[str, nn.Module], action: str) -> None:
    if _merged_layers(components):
        raise RuntimeError(f"adapters are merged into the weights; call unmerge_adapter(...) before {action}")


def set_adapters(
    pipeline_or_model: Any, names: Sequence[str] | str, weights: Sequence[float] | float | None = None
) -> None:
    """Choose the active adapters (composed in the given order) and a scale for each (default 1.0
    for every named adapter, as diffusers' ``set_adapters`` does; earlier scales are not kept).

    On a pipeline every adapted component gets the named adapters it carries (a component that
    carries none of them runs as the base model).  See the module docstring for what the scale
    means per method.
    """
    names = [names] if isinstance(names, str) else list(names)
    if not is_pipeline(pipeline_or_model):
        _model.set_adapters(pipeline_or_model, names, weights)
        return
    components = _require(pipeline_or_model)
    known = adapter_names(pipeline_or_model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; this pipeline has {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeated in {names}")
    scales = _model.adapter_weights(names, weights)
    _refuse_if_merged(components, "changing the active adapters")
    for module in components.values():
        present = [i for i, n in enumerate(names) if n in adapter_configs(module)]
        _model.set_adapters(module, [names[i] for i in present], [scales[i] for i in present])


def set_adapter_enabled(pipeline_or_model: Any, enabled: bool) -> None:
    """Turn all (unmerged) adapters of a pipeline or model on or off without removing them."""
    if not is_pipeline(pipeline_or_model):
        return _model.set_adapter_enabled(pipeline_or_model, enabled)
    components = _require(pipeline_or_model)
    if not enabled:
        _refuse_if_merged(components, "disabling")
    for module in components.values():
        _model.set_adapter_enabled(module, enabled)


def merge_adapter(pipeline_or_model: Any) -> None:
    """Fold the active adapters into the weights of every adapted component (base-model speed)."""
    if not is_pipeline(pipeline_or_model):
        return _model.merge_adapter(pipeline_or_model)
    for module in _require(pipeline_or_model).values():
        _model.merge_adapter(module)


def unmerge_adapter(pipeline_or_model: Any) -> None:
    """Undo :func:`merge_adapter` on every adapted component."""
    if not is_pipeline(pipeline_or_model):
        return _model.unmerge_adapter(pipeline_or_model)
    for module in _require(pipeline_or_model).values():
        _model.unmerge_adapter(module)


def remove_adapter(pipeline_or_model: Any, adapter_name: str | None = None) -> Any:
    """Remove one adapter (or all) from a pipeline or model; the base layers come back."""
    if not is_pipeline(pipeline_or_model):
        return _model.remove_adapter(pipeline_or_model, adapter_name)
    components = adapted_components(pipeline_or_model)
    if adapter_name is not None and adapter_name not in adapter_names(pipeline_or_model):
        raise ValueError(f"no adapter named {adapter_name!r}; this pipeline has {adapter_names(pipeline_or_model)}")
    for module in components.values():
        if adapter_name is None or adapter_name in adapter_configs(module):
            _model.remove_adapter(module, adapter_name)
    return pipeline_or_model


def adapter_name_from_path(path: str | os.PathLike, taken: Sequence[str] = ()) -> str:
    """A valid adapter name (no dots) from a file name, unique among ``taken``."""
    stem = re.sub(r"[^0-9A-Za-z_-]+", "_", Path(path).stem).strip("_") or "adapter"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def load_adapters(
    pipeline_or_model: Any,
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    names: Sequence[str] | None = None,
    weights: Sequence[float] | float | None = None,
) -> list[str]:
    """Load several adapter files under names (default: from the file names) and make exactly
    them active, composed in the given order, with the given scales.  All or nothing: if one
    file fails, the ones loaded by this call are removed again.  Returns the names."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if names is not None and len(names) != len(paths):
        raise ValueError(f"{len(paths)} adapter files but {len(names)} names")
    _model.adapter_weights([str(p) for p in paths], weights)  # checks the count before loading
    existing = adapter_names(pipeline_or_model)
    components = adapted_components(pipeline_or_model)
    _refuse_if_merged(components, "loading another adapter")
    chosen: list[str] = []
    for i, path in enumerate(paths):
        name = names[i] if names is not None else adapter_name_from_path(path, existing + chosen)
        if name in existing + chosen:
            raise ValueError(f"an adapter named {name!r} is already loaded; pick another name")
        chosen.append(name)
    loaded: list[str] = []
    try:
        for path, name in zip(paths, chosen, strict=True):
            load_adapter(pipeline_or_model, path, adapter_name=name)
            loaded.append(name)
    except BaseException:
        for name in loaded:
            remove_adapter(pipeline_or_model, name)
        raise
    set_adapters(pipeline_or_model, chosen, weights)
    return chosen


def _snapshot(components: dict[str, nn.Module]) -> list[tuple[OrthoLinear, list[str], dict[str, float], bool]]:
    """(layer, active adapters, scales, enabled) of every adapted layer."""
    return [
        (layer, list(layer.active_adapters), dict(layer.adapter_scales), layer.adapters_enabled)
        for module in components.values()
        for layer in ortho_layers(module)
    ]


FILES_ATTR = "_ortho_adapter_files"  # {resolved file path: adapter name}, kept on the pipeline / model


def _resolve_adapters(pipeline_or_model: Any, adapters: Sequence[str | os.PathLike]) -> list[str]:
    """Adapter names for a list of names or file paths; files not seen before are loaded (active)."""
    names = []
    for item in adapters:
        known = adapter_names(pipeline_or_model)
        if isinstance(item, str) and item in known:
            names.append(item)
            continue
        is_path = isinstance(item, os.PathLike) or str(item).endswith(".safetensors") or os.path.exists(item)
        if not is_path:
            raise ValueError(f"{item!r} is neither a loaded adapter ({known}) nor an adapter file")
        key = str(Path(item).resolve())
        files = dict(getattr(pipeline_or_model, FILES_ATTR, {}))
        if files.get(key) in known:
            names.append(files[key])
            continue
        name = adapter_name_from_path(item, known)
        load_adapter(pipeline_or_model, item, adapter_name=name)
        files[key] = name
        setattr(pipeline_or_model, FILES_ATTR, files)
        names.append(name)
    return names


@contextlib.contextmanager
def use_adapters(
    pipeline_or_model: Any,
    adapters: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    weights: Sequence[float] | float | None = None,
) -> Iterator[list[str]]:
    """Activate ``adapters`` (loaded names or adapter files; default: the active ones) with
    ``weights`` for the duration of a ``with`` block; the previous choice, scales and enabled state
    come back on exit.  Files are loaded on first use and kept (inactive) for later calls::

        with use_adapters(pipe, ["subject.safetensors", "style.safetensors"], [1.0, 0.6]):
            image = pipe(prompt).images[0]
    """
    _refuse_if_merged(adapted_components(pipeline_or_model), "switching adapters for one call")
    before = {id(entry[0]): entry for entry in _snapshot(adapted_components(pipeline_or_model))}
    try:
        if adapters is None:
            active = active_adapters(pipeline_or_model)
            names = list(active) or adapter_names(pipeline_or_model)
            if weights is None and active:
                weights = list(active.values())  # keep the current scales
        else:
            items = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
            names = _resolve_adapters(pipeline_or_model, items)
        _require(pipeline_or_model)
        set_adapter_enabled(pipeline_or_model, True)
        set_adapters(pipeline_or_model, names, weights)
        yield names
    finally:
        for module in adapted_components(pipeline_or_model).values():
            for layer in ortho_layers(module):
                if id(layer) in before:
                    _, active, scales, enabled = before[id(layer)]
                    layer.active_adapters, layer.adapter_scales, layer.adapters_enabled = active, scales, enabled
                else:  # a layer first adapted inside the block: nothing was active on it before
                    layer.active_adapters = []
                layer.clear_cache()


# ---- which base model a file was made for -------------------------------------------------------

_UNET_CROSS_DIMS = {
    768: "Stable Diffusion 1.x (UNet cross-attention width 768)",
    1024: "Stable Diffusion 2.x (UNet cross-attention width 1024)",
    2048: "Stable Diffusion XL (UNet cross-attention width 2048)",
    32: "the built-in tiny test model (diffusion_oft.tiny, cross-attention width 32)",
}
_TRANSFORMER_WIDTHS = {
    1536: "SD3 / SD3.5 Medium (transformer width 1536)",
    2432: "SD3.5 Large (transformer width 2432)",
    3072: "FLUX.1 (transformer width 3072)",
    64: "the built-in tiny SD3 / Flux model (diffusion_oft.tiny, transformer width 64)",
}
_TEXT_WIDTHS = {
    "text_encoder": {768: "CLIP ViT-L/14 (SD 1.x, SDXL)", 1024: "OpenCLIP ViT-H/14 (SD 2.x)"},
    "text_encoder_2": {1280: "OpenCLIP ViT-bigG/14 (SDXL)"},
}


def _input_width(key: str, shape: tuple[int, ...]) -> int | None:
    """A projection's input width from one of its adapter tensors, whatever the method (None if unknown):
    the first method class that reads it (``OrthoMethod.input_width``)."""
    name = key.rsplit(".", 1)[-1]
    for cls in METHOD_REGISTRY.values():
        width = cls.input_width(None, name, shape)
        if width:
            return width
    return None


def base_model_hints(path: str | os.PathLike) -> dict[str, str]:
    """{component: a line saying which base model the adapter fits}, from the saved base-model
    metadata and the widths the tensor shapes imply (cross-attention / text-encoder width)."""
    import json

    from .files import parse_metadata, read_adapter_file

    tensors, metadata = read_adapter_file(path)
    configs = parse_metadata(metadata, Path(path).name)
    base = json.loads(metadata.get("base_model", "{}") or "{}")
    hints = {}
    for comp, config in configs.items():
        parts = []
        width = None
        method_cls = get_method_class(config.method)
        if method_cls.transforms_input(config):
            probe = {"unet": ".attn2.to_k.", "controlnet": ".attn2.to_k.", "transformer": ".attn.to_q."}.get(
                comp, ".self_attn.q_proj."
            )
            for key, tensor in tensors.items():
                if key.startswith(comp + ".") and probe in key:
                    width = method_cls.input_width(config, key.rsplit(".", 1)[-1], tuple(tensor.shape))
                    if width:
                        break
        if comp in ("unet", "controlnet") and width:
            parts.append(_UNET_CROSS_DIMS.get(width, f"a UNet with cross-attention width {width}"))
        elif comp == "transformer" and width:
            parts.append(_TRANSFORMER_WIDTHS.get(width, f"a transformer of width {width}"))
        elif comp in _TEXT_WIDTHS and width:
            parts.append(_TEXT_WIDTHS[comp].get(width, f"a text encoder of width {width}"))
        info = base.get(comp, {})
        if info.get("class"):
            parts.append(
                f"made on a {info['class']}" + (f" from {info['name_or_path']}" if info.get("name_or_path") else "")
            )
        if parts:
            hints[comp] = "; ".join(parts)
    return hints
