"""Exports that need the base weights: ``diff`` (kohya-style full weight deltas, any method) and
``merged`` (a diffusers model / pipeline folder with the adapter folded in)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..attention import uninstall_processors
from ..files import atomic_save_file, is_pipeline
from ..model import CONFIGS_ATTR, adapter_configs, named_ortho_layers, remove_adapter, replace_submodule
from .common import ConversionError, NativeAdapter
from .kohya_names import kohya_name

TEMP_ADAPTER = "diffusion_oft_convert"
WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def diff_dtype(weight_dtype: torch.dtype, dtype: str = "auto") -> torch.dtype:
    """'auto': one step wider than the weights (fp16/bf16 -> float32, float32 -> float64), which
    makes ``W + diff`` (in that dtype, rounded back) reproduce the merged weights bit for bit."""
    if dtype == "auto":
        return WIDER.get(weight_dtype, torch.float64)
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def merged_weights(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """{layer path: weight with the adapter applied}, computed exactly as ``merge_adapter`` does
    (float64, rounded to the weight's dtype)."""
    out = {}
    for path, layer in named_ortho_layers(model):
        if adapter_name in layer.ortho_adapters:
            w = layer.base_layer.weight
            out[path] = layer.adapted_weight([adapter_name], dtype=torch.float64).to(w.dtype)
    return out


def native_to_diff(
    native: NativeAdapter, target, dtype: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya-style ``<name>.diff`` = merged weight - base weight for every adapted layer."""
    from .common import load_native

    load_native(target, native, adapter_name=TEMP_ADAPTER)
    components = list(native.configs)
    state = {}
    try:
        for comp in components:
            module = getattr(target, comp) if is_pipeline(target) else target
            for path, merged in merged_weights(module, TEMP_ADAPTER).items():
                base = module.get_submodule(path).base_layer.weight
                wide = diff_dtype(base.dtype, dtype)
                state[f"{kohya_name(comp, path, components)}.diff"] = (
                    (merged.to(wide) - base.detach().to(wide)).cpu().contiguous()
                )
    finally:
        for comp in components:
            module = getattr(target, comp) if is_pipeline(target) else target
            if TEMP_ADAPTER in adapter_configs(module):
                remove_adapter(module, TEMP_ADAPTER)
    metadata = {"converted_by": f"diffusion-oft {__version__}", "ss_network_module": "networks.lora"}
    return state, metadata


def write_diff(native: NativeAdapter, target, path: str | os.PathLike, dtype: str = "auto") -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path.name}: diff files are .safetensors")
    state, metadata = native_to_diff(native, target, dtype)
    atomic_save_file(state, path, metadata)
    return path


@torch.no_grad()
def bake(module: nn.Module) -> nn.Module:
    """Fold every active adapter into the weights and put the plain nn.Linear layers back, so the
    model saves (``save_pretrained``) as an ordinary diffusers / transformers model."""
    for path, layer in named_ortho_layers(module):
        layer.merge()
        replace_submodule(module, path, layer.base_layer)
    uninstall_processors(module)
    if hasattr(module, CONFIGS_ATTR):
        setattr(module, CONFIGS_ATTR, {})
    return module


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The dtype a model folder's weights are stored in (its first floating-point tensor), if known;
    the files ``from_pretrained`` reads without a variant first (not ``*.fp16.safetensors``)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
    for file in plain or files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    return None


def load_base(model_path: str | os.PathLike, native: NativeAdapter):
    """A diffusers pipeline folder (model_index.json) or one model folder (config.json), loaded in
    the dtype its weights are stored in (fp16 / bf16 folders stay fp16 / bf16)."""
    from ..model_paths import resolve_model_path

    path = Path(resolve_model_path(str(model_path), "--model"))
    if (path / "model_index.json").is_file() or not path.exists():
        from diffusers import DiffusionPipeline

        dtypes = [stored_dtype(path / c) for c in native.configs if (path / c).is_dir()]
        dtype = next((d for d in dtypes if d is not None), None)
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path}: neither a diffusers pipeline folder (model_index.json) nor a model folder")
    comps = list(native.configs)
    if len(comps) != 1:
        raise ConversionError(f"{path}: one model folder, but the adapter is for {comps}; give the pipeline folder")
    comp = comps[0]
    dtype = stored_dtype(path)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if comp.startswith("text_encoder"):
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(path), **kwargs)
    import diffusers

    cls_name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ConversionError(f"{path}: unknown model class {cls_name!r} in config.json")
    return cls.from_pretrained(str(path), **kwargs)


def write_merged(native: NativeAdapter, model_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Base model/pipeline + adapter -> a folder ``from_pretrained`` loads, adapter merged in."""
    from .common import load_native

    out_dir = Path(out_dir)
    target = load_base(model_path, native)
    load_native(target, native)
    modules = [getattr(target, c) for c in native.configs] if is_pipeline(target) else [target]
    for module in modules:
        bake(module)
    target.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
