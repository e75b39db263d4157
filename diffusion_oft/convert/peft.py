"""PEFT OFT / BOFT / HRA adapters (``adapter_model.safetensors`` + ``adapter_config.json``), both ways.

PEFT transforms the layer's **input** side, like diffusion-oft's default ``side="input"``.  This module
does the names (keys, folders, adapter_config.json, which component); ``peft_math`` the tensors of each
PEFT type (signs, layouts, COFT): OFT (v2) ``oft_R.weight``, BOFT ``boft_R`` / ``boft_s``, HRA ``hra_u``.
Which of our methods a PEFT type is, and back, the method classes say (``peft_type``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from ..files import COMPONENT_NAMES, AdapterFileError, atomic_save_file, read_adapter_file
from ..methods import get_method_class
from ..methods.base import method_by
from .common import (
    ConversionError,
    NativeAdapter,
    linear_dims,
    resolve_component,
    structure_fields,
    target_fields,
    warn,
)
from .peft_math import (
    block_size_from_triangle,
    boft_from_peft,
    boft_to_peft,
    coft_project,
    hra_from_peft,
    hra_to_peft,
    oft_from_peft,
    oft_to_peft,
)

__all__ = [
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "block_size_from_triangle",
    "coft_project",
    "is_peft_key",
    "native_component_to_peft",
    "native_to_peft",
    "peft_to_native",
    "read_peft",
]

PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# PEFT 0.18 changed its Cayley-Neumann series; older Neumann adapters use another formula.
MIN_NEUMANN_VERSION = (0, 18)
# PEFT's tensor names: (pattern, peft_type, our group name).  Adapter names may sit inside the key.
_KEYS = (
    (re.compile(r"^(?P<path>.+)\.oft_R(?:\.[^.]+)?\.weight$"), "OFT", "oft_R"),
    (re.compile(r"^(?P<path>.+)\.boft_R(?:\.[^.]+)?$"), "BOFT", "boft_R"),
    (re.compile(r"^(?P<path>.+)\.boft_s(?:\.[^.]+)?$"), "BOFT", "boft_s"),
    (re.compile(r"^(?P<path>.+)\.hra_u(?:\.[^.]+)?$"), "HRA", "hra_u"),
)


def is_peft_key(key: str) -> bool:
    return any(pattern.match(key) for pattern, _, _ in _KEYS)


def read_peft(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """Tensors and adapter_config.json (None if absent) of a PEFT folder or weights file."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        raise AdapterFileError(f"{path}: a folder without {WEIGHTS_NAME} (not a PEFT adapter folder)")
    tensors, _ = read_adapter_file(weights)
    config_path = weights.parent / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    return tensors, config, path.name


def _version_tuple(text: str | None) -> tuple[int, ...]:
    nums = re.findall(r"\d+", (text or "0").partition("@")[0])[:3]
    return tuple(int(n) for n in nums) or (0,)


def _split_component(path: str) -> tuple[str | None, str]:
    head, _, rest = path.partition(".")
    if head in COMPONENT_NAMES and rest:
        return head, rest
    return None, path


def _group_keys(tensors: dict[str, torch.Tensor], name: str) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(PEFT type, {group: {module path: float tensor}}) of a state dict; one-line errors for the rest."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    types = set()
    for key, tensor in tensors.items():
        inner = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        for pattern, peft_type, group in _KEYS:
            if m := pattern.match(inner):
                groups.setdefault(group, {})[m["path"]] = tensor.float()
                types.add(peft_type)
                break
        else:
            raise AdapterFileError(
                f"{name}: tensor {key!r} is not an OFT/BOFT/HRA adapter parameter (trained biases or "
                "modules_to_save cannot be represented by an orthogonal adapter)"
            )
    if len(types) > 1:
        raise AdapterFileError(f"{name}: mixes PEFT {' and '.join(sorted(types))} tensors")
    boft_r, boft_s = groups.get("boft_R", {}), groups.get("boft_s", {})
    if boft_s and set(boft_s) - set(boft_r):
        raise AdapterFileError(f"{name}: boft_s without boft_R for {sorted(set(boft_s) - set(boft_r))[0]!r}")
    if not types or (types == {"BOFT"} and not boft_r):
        raise AdapterFileError(f"{name}: no PEFT OFT/BOFT/HRA tensors")
    return types.pop(), groups


def _component(
    layer_paths: list[str], name: str, candidates: dict[str, nn.Module] | None, prefix_component: str | None
) -> tuple[str, dict[str, str], nn.Module | None, dict[str, tuple[int, int]]]:
    """(component, {PEFT path: module path}, the model when at hand, its linear layers' dims): a prefix in
    the keys names the component, else the candidate that has every module."""
    split = {p: _split_component(p) for p in layer_paths}
    comps = {c for c, _ in split.values()}
    if len(comps) > 1:
        raise AdapterFileError(f"{name}: keys for several components {sorted(c or '?' for c in comps)}")
    comp = comps.pop() or prefix_component
    paths = {p: rest for p, (_, rest) in split.items()}
    module = None
    if candidates:
        if comp is None or comp not in candidates:
            comp = (
                next(iter(candidates))
                if len(candidates) == 1
                else resolve_component(sorted(paths.values()), candidates, name)
            )
        module = candidates[comp]
    dims: dict[str, tuple[int, int]] = {}
    if module is not None:
        dims = linear_dims(module)
        missing = [p for p in paths.values() if p not in dims]
        if missing:
            raise AdapterFileError(
                f"{name}: module {missing[0]!r} is not a linear layer of this {type(module).__name__} "
                "(a file for another base model, or an adapter on a convolution, which diffusion-oft does not adapt)"
            )
    return comp or "unet", paths, module, dims


def peft_to_native(
    tensors: dict[str, torch.Tensor],
    peft_config: dict | None,
    name: str,
    candidates: dict[str, nn.Module] | None = None,
    prefix_component: str | None = None,
    source_format: str = "peft",
) -> NativeAdapter:
    """PEFT state dict (+ its config) -> NativeAdapter.

    candidates: {component: model} the adapter may be for (resolves the component and gives
    layer sizes); prefix_component: the component named by the file itself (kohya prefixes).
    """
    cfg = dict(peft_config or {})
    declared = str(cfg.get("peft_type", "")).upper() or None
    peft_type, groups = _group_keys(tensors, name)
    if declared and declared not in ("OFT", "BOFT", "HRA"):
        raise AdapterFileError(f"{name}: a PEFT {declared} adapter, not OFT, BOFT or HRA")
    main_group = {"OFT": "oft_R", "BOFT": "boft_R", "HRA": "hra_u"}[peft_type]
    comp, paths, module, dims = _component(list(groups[main_group]), name, candidates, prefix_component)

    def ours(group: str) -> dict[str, torch.Tensor]:
        return {paths[p]: t for p, t in groups.get(group, {}).items()}

    if peft_type == "OFT":
        neumann = bool(cfg.get("use_cayley_neumann", True))
        if peft_config is not None and neumann and _version_tuple(cfg.get("peft_version")) < MIN_NEUMANN_VERSION:
            raise AdapterFileError(
                f"{name}: a Cayley-Neumann OFT adapter from PEFT < 0.18, whose series differs from the current "
                "one; load it with that PEFT version and save it with exact Cayley, or retrain"
            )
        in_dims = {p: d[0] for p, d in dims.items()}
        layers, shapes, fields = oft_from_peft(ours("oft_R"), cfg, name, in_dims, peft_config is not None)
    elif peft_type == "BOFT":
        layers, shapes, fields = boft_from_peft(ours("boft_R"), ours("boft_s"), cfg, name)
    else:
        layers, shapes, fields = hra_from_peft(ours("hra_u"), cfg, name)
    kwargs: dict = {"side": "input", "method": method_by(peft_type=peft_type).name, **fields}
    kwargs.update(structure_fields(shapes, name))
    kwargs["extra"] = {"converted_from": source_format}
    kwargs.update(target_fields(list(shapes), kwargs, module))
    config = AdapterConfig(**kwargs)
    out = {f"{comp}.{path}.{param}": t for path, params in layers.items() for param, t in params.items()}
    base = {comp: {"name_or_path": str(cfg.get("base_model_name_or_path") or "")}}
    return NativeAdapter({comp: config}, out, source_format, base)


# ---- export ---------------------------------------------------------------------------------------


def _installed_peft_version() -> str:
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return "0.18.0"


def _peft_config_json(config: AdapterConfig, peft_type: str, paths: list[str], base_name: str) -> dict:
    common = {
        "peft_type": peft_type,
        "auto_mapping": None,
        "base_model_name_or_path": base_name or None,
        "revision": None,
        "task_type": None,
        "inference_mode": True,
        "peft_version": _installed_peft_version(),
        "target_modules": sorted(paths),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    b, n = config.block_size or 0, (0 if config.block_size else config.num_blocks)
    if peft_type == "HRA":
        common.update(r=config.n_reflections, apply_GS=False)
    elif peft_type == "OFT":
        neumann = config.cayley_mode == "neumann"
        common.update(
            r=n,
            oft_block_size=b,
            module_dropout=config.dropout,
            coft=False,
            eps=6e-5,
            block_share=False,
            use_cayley_neumann=neumann,
            num_cayley_neumann_terms=config.neumann_terms + 2 if neumann else 5,
        )
    else:
        common.update(
            boft_block_size=b,
            boft_block_num=n,
            boft_n_butterfly_factor=config.n_butterfly_factors,
            boft_dropout=config.dropout,
        )
    return common


def native_component_to_peft(
    native: NativeAdapter, comp: str, dims: dict[str, tuple[int, int]] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """One component -> (PEFT state dict, adapter_config.json content)."""
    config = native.configs[comp]
    method_cls = get_method_class(config.method)
    where = f"{comp} adapter ({config.method}, side={config.side})"
    peft_type = method_cls.peft_type
    if peft_type is None:
        raise ConversionError(f"{where}: PEFT has no {method_cls.label}; use --to diff or --to merged")
    if config.side != "input":
        raise ConversionError(
            f"{where}: PEFT rotates the input side only; an output-side adapter converts exactly with --to kohya "
            "(or --to diff / --to merged)"
        )
    if peft_type == "OFT" and config.magnitude:
        peft_type = "BOFT"  # PEFT OFT has no per-output scale; PEFT BOFT with m = 1 is OFT with boft_s
    if peft_type == "BOFT" and config.cayley_mode != "exact":
        raise ConversionError(
            f"{where}: PEFT's BOFT uses the exact Cayley transform only, this adapter was trained with the "
            "Cayley-Neumann series; use --to diff or --to merged"
        )
    m = config.n_butterfly_factors  # 1 for every method but BOFT
    if peft_type == "BOFT" and m > 1:
        warn(
            f"{where}: n_butterfly_factors={m}: PEFT runs BOFT with m > 1 only with its CUDA extension (fbd_cuda); "
            "on CPU, or when that extension does not build, PEFT silently sets m = 1 and cannot load this adapter"
        )
    if peft_type == "HRA" and (config.num_blocks != 1 or config.magnitude):
        raise ConversionError(
            f"{where}: PEFT's HRA has one block per layer and no per-output scale (this adapter: "
            f"{'magnitude' if config.magnitude else f'num_blocks={config.num_blocks}'}); use --to diff or --to merged"
        )
    layers = native.layers(comp)
    if peft_type == "OFT":
        peft_layers = oft_to_peft(layers, exact=config.cayley_mode == "exact")
    elif peft_type == "BOFT":
        peft_layers, missing_scale = boft_to_peft(layers, m, dims)
        if missing_scale:
            warn(
                f"{where}: boft_s (all ones) left out for {len(missing_scale)} layers because their output sizes "
                "are unknown (give the base model to write them); PEFT then keeps its initial value 1"
            )
    else:
        peft_layers = hra_to_peft(layers)
    state = {f"{PEFT_PREFIX}{path}.{param}": t for path, params in peft_layers.items() for param, t in params.items()}
    base_name = str(native.base_model.get(comp, {}).get("name_or_path", "") or "")
    peft_config = _peft_config_json(config, peft_type, list(layers), base_name)
    return state, peft_config


def native_to_peft(
    native: NativeAdapter, out_dir: str | os.PathLike, dims: dict[str, dict[str, tuple[int, int]]] | None = None
) -> list[Path]:
    """Write PEFT adapter folder(s): ``out_dir`` for one component, ``out_dir/<component>`` for several."""
    out_dir = Path(out_dir)
    if out_dir.suffix == ".safetensors":
        raise ConversionError(f"{out_dir}: PEFT adapters are folders (adapter_model.safetensors + adapter_config.json)")
    written = []
    comps = list(native.configs)
    for comp in comps:
        state, peft_config = native_component_to_peft(native, comp, (dims or {}).get(comp))
        folder = out_dir if len(comps) == 1 else out_dir / comp
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_file(state, folder / WEIGHTS_NAME, {"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(folder)
    return written
