"""LoRA exports (``lora``: diffusers' layout, ``kohya-lora``: kohya's), from the weight change ΔW = W' − W.

An adapted layer changes its weight by ΔW = diag(s) R_out W R_in^T − W.  For ETHER / ETHER+ (no
magnitude) R = I + U V^T per side with thin U, V (d, n·k), so ΔW is exactly low rank:

    input:  ΔW = (W V) U^T                    output: ΔW = U' (V'^T W)
    both:   ΔW = [W V + U' (V'^T W V)] U^T + U' (V'^T W)        (rank ≤ r_in + r_out)

and the LoRA is built from these thin products (float64).  OFT / BOFT (and any layer with a
magnitude) have full-rank ΔW in general: its truncated SVD is the best LoRA of each rank
(Eckart–Young).  Either way the factors are rebalanced through an SVD of the small core, so the
per-layer rank can be cut (``rank`` / ``max_error``) and the relative Frobenius error
||ΔW − B A||_F / ||ΔW||_F is known exactly from the singular values.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..files import atomic_save_file, is_pipeline
from ..layers import OrthoLinear, _apply_to_weight
from ..model import adapter_configs, named_ortho_layers, remove_adapter
from .common import ConversionError, NativeAdapter
from .kohya_names import kohya_name

DEFAULT_MAX_ERROR = 0.05  # OFT / BOFT default: 5 % relative Frobenius error of each layer's ΔW
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
TEMP_ADAPTER = "diffusion_oft_lora_export"
LORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)\.weight$")


@dataclass
class LayerLoRA:
    """One layer's LoRA: ΔW ≈ up @ down; up (out, r), down (r, in), float32."""

    up: torch.Tensor
    down: torch.Tensor
    error: float  # relative Frobenius error of up @ down against ΔW (0: exact)
    structural: bool  # ΔW is low rank by construction (ETHER / ETHER+ without magnitude)

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def is_lora_key(key: str) -> bool:
    return bool(LORA_KEY.search(key))


def lora_layout(keys) -> str | None:
    """'diffusers' or 'kohya' for a LoRA file's keys, None when it holds no LoRA factors."""
    keys = list(keys)
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    return None


def _thin_factors(weight: torch.Tensor, transforms: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank transforms (ETHER / ETHER+ / HRA): (up (out, r), down (r, in)) with
    up @ down = R_out W R_in^T − W exactly (float64)."""
    ups, downs = [], []
    if "input" in transforms:
        u, v = transforms["input"].thin(torch.float64)  # R_in = I + U V^T: (in, r1) each
        wv = weight @ v  # (out, r1)
    if "output" in transforms:
        u2, v2 = transforms["output"].thin(torch.float64)  # R_out = I + U' V'^T: (out, r2) each
        vw = v2.t() @ weight  # V'^T W: (r2, in)
    if "input" in transforms:
        ups.append(wv + u2 @ (vw @ v) if "output" in transforms else wv)
        downs.append(u.t())
    if "output" in transforms:
        ups.append(u2)
        downs.append(vw)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _rebalanced(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_s, s, V_s^T) with up @ down = U_s diag(s) V_s^T, s descending: QR of both thin factors,
    then the SVD of the small (r, r) core (float64)."""
    q_up, r_up = torch.linalg.qr(up)  # (out, r'), (r', r)
    q_down, r_down = torch.linalg.qr(down.t())  # (in, r''), (r'', r)
    u_c, s, vh_c = torch.linalg.svd(r_up @ r_down.t())
    return q_up @ u_c, s, vh_c @ q_down.t()


def choose_rank(s: torch.Tensor, rank: int | None, max_error: float | None) -> tuple[int, float]:
    """(r, relative Frobenius error) for singular values ``s`` (descending): ``rank`` caps r,
    ``max_error`` takes the smallest r whose error is within it; at least 1."""
    energy = s.double().pow(2)
    total = float(energy.sum())
    # tail[r] = sum of s_i^2 for i >= r (r = 0..len)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    errors = (tail / total).sqrt() if total > 0 else torch.zeros_like(tail)
    r = len(s)
    if max_error is not None:
        within = (errors <= max_error).nonzero()
        r = min(r, int(within[0]) if len(within) else r)
    if rank is not None:
        r = min(r, rank)
    r = max(1, r)
    return r, float(errors[r])


@torch.no_grad()
def layer_lora(
    layer: OrthoLinear, adapter_name: str, rank: int | None = None, max_error: float | None = None
) -> LayerLoRA:
    """The LoRA of one adapted layer's weight change.

    Without ``rank`` / ``max_error``: ETHER / ETHER+ / HRA exact (their structural rank), others at
    ``DEFAULT_MAX_ERROR``.
    """
    weight = layer.base_layer.weight.detach().double()  # (out, in)
    transforms, magnitude = layer._transforms(adapter_name)
    structural = magnitude is None and all(t.low_rank for t in transforms.values())
    if structural:
        u_s, s, vh_s = _rebalanced(*_thin_factors(weight, transforms))
    else:
        delta = _apply_to_weight(weight, transforms, magnitude) - weight
        u_s, s, vh_s = torch.linalg.svd(delta, full_matrices=False)
    if rank is None and max_error is None:
        max_error = 0.0 if structural else DEFAULT_MAX_ERROR
    if structural and rank is None and max_error == 0.0:
        r, error = len(s), 0.0  # exact: every factor of the structure kept (no singular value dropped)
    else:
        r, error = choose_rank(s, rank, max_error)
    root = s[:r].sqrt()
    up = (u_s[:, :r] * root).float().contiguous()  # balanced: both factors carry sqrt(s)
    down = (root[:, None] * vh_s[:r]).float().contiguous()
    return LayerLoRA(up, down, error, structural)


@contextlib.contextmanager
def _loaded(native: NativeAdapter, target):
    """The adapter loaded into ``target`` under a temporary name; removed afterwards."""
    from .common import load_native

    load_native(target, native, adapter_name=TEMP_ADAPTER)
    try:
        yield
    finally:
        for comp in native.configs:
            module = _component(target, comp)
            if TEMP_ADAPTER in adapter_configs(module):
                remove_adapter(module, TEMP_ADAPTER)


def _component(target, comp: str) -> nn.Module:
    return getattr(target, comp) if is_pipeline(target) else target


def native_to_lora(
    native: NativeAdapter, target, rank: int | None = None, max_error: float | None = None
) -> dict[str, dict[str, LayerLoRA]]:
    """{component: {module path: LayerLoRA}} for every adapted layer (target: the base model)."""
    if rank is not None and rank < 1:
        raise ConversionError(f"--rank must be >= 1, got {rank}")
    if max_error is not None and not 0 <= max_error < 1:
        raise ConversionError(f"--max_error must be in [0, 1), got {max_error}")
    out: dict[str, dict[str, LayerLoRA]] = {}
    with _loaded(native, target):
        for comp in native.configs:
            layers = named_ortho_layers(_component(target, comp))
            out[comp] = {
                path: layer_lora(layer, TEMP_ADAPTER, rank, max_error)
                for path, layer in layers
                if TEMP_ADAPTER in layer.ortho_adapters
            }
    return out


def lora_state_dict(loras: dict[str, dict[str, LayerLoRA]], layout: str) -> dict[str, torch.Tensor]:
    """diffusers: ``<comp>.<path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r), scale 1;
    kohya: ``<kohya name>.lora_down.weight`` / ``.lora_up.weight`` and ``.alpha`` = r (scale 1)."""
    state: dict[str, torch.Tensor] = {}
    components = list(loras)
    for comp, layers in loras.items():
        for path, lora in layers.items():
            if layout == "diffusers":
                state[f"{comp}.{path}.lora_A.weight"] = lora.down
                state[f"{comp}.{path}.lora_B.weight"] = lora.up
            else:
                name = kohya_name(comp, path, components)
                state[f"{name}.lora_down.weight"] = lora.down
                state[f"{name}.lora_up.weight"] = lora.up
                state[f"{name}.alpha"] = torch.tensor(float(lora.rank))
    return state


def _peft_metadata(loras: dict[str, dict[str, LayerLoRA]]) -> dict:
    """diffusers' ``lora_adapter_metadata`` (LoraConfig fields per component): alpha = rank in every
    layer, so mixed ranks keep scale 1 (diffusers otherwise infers alphas from the first layer)."""
    meta = {}
    for comp, layers in loras.items():
        ranks = {path: lora.rank for path, lora in layers.items()}
        common = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {p: r for p, r in ranks.items() if r != common}
        meta.update(
            {
                f"{comp}.r": common,
                f"{comp}.lora_alpha": common,
                f"{comp}.rank_pattern": pattern,
                f"{comp}.alpha_pattern": dict(pattern),
                f"{comp}.target_modules": sorted(ranks),
            }
        )
    return meta


def group_name(path: str) -> str:
    """Layers grouped for the summary by attention kind and projection, e.g. ``attn2.to_k``."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("attn") or parts[i] in ("self_attn", "attention", "ff", "mlp"):
            return ".".join(parts[i:])
    return ".".join(p for p in parts if not p.isdigit()) or path


def summary(loras: dict[str, dict[str, LayerLoRA]]) -> list[dict]:
    """Per (component, layer group): layers, rank range, parameters, max / mean error."""
    rows: dict[tuple[str, str], list[LayerLoRA]] = {}
    for comp, layers in loras.items():
        for path, lora in layers.items():
            rows.setdefault((comp, group_name(path)), []).append(lora)
    out = []
    for (comp, group), items in sorted(rows.items()):
        ranks = [x.rank for x in items]
        out.append(
            {
                "component": comp,
                "group": group,
                "layers": len(items),
                "rank_min": min(ranks),
                "rank_max": max(ranks),
                "parameters": sum(x.up.numel() + x.down.numel() for x in items),
                "dense_parameters": sum(x.up.shape[0] * x.down.shape[1] for x in items),
                "error_max": max(x.error for x in items),
                "error_mean": sum(x.error for x in items) / len(items),
                "exact": all(x.structural and x.error == 0.0 for x in items),
            }
        )
    return out


def format_summary(rows: list[dict], size_bytes: int) -> str:
    lines = []
    for row in rows:
        ranks = f"{row['rank_min']}" if row["rank_min"] == row["rank_max"] else f"{row['rank_min']}-{row['rank_max']}"
        err = "exact" if row["exact"] else f"error max {row['error_max']:.4f}, mean {row['error_mean']:.4f}"
        lines.append(f"  {row['component']} {row['group']}: {row['layers']} layers, rank {ranks}, {err}")
    n = sum(r["layers"] for r in rows)
    worst = max((r["error_max"] for r in rows), default=0.0)
    dense = sum(r["dense_parameters"] for r in rows) * 4 / 2**20
    lines.append(
        f"  total: {n} layers, max error {worst:.4f}, file size {size_bytes / 2**20:.2f} MiB "
        f"(the exact full deltas, --to diff --dtype float32: {dense:.2f} MiB)"
    )
    if size_bytes / 2**20 > dense:
        lines.append(
            "  note: this LoRA is larger than the exact full deltas: its weight changes are not low rank; "
            "lower --rank / raise --max_error, or use --to diff (ComfyUI, A1111) or --to kohya"
        )
    return "\n".join(lines)


def _base_name(native: NativeAdapter, model) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    for info in native.base_model.values():
        if info.get("name_or_path"):
            return str(info["name_or_path"])
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    return str(name or type(model).__name__)


def write_lora(
    native: NativeAdapter,
    target,
    dst: str | os.PathLike,
    layout: str = "diffusers",
    rank: int | None = None,
    max_error: float | None = None,
    base_name: str | None = None,
) -> tuple[Path, str]:
    """Write the LoRA of ``native`` on ``target`` (the loaded base model); returns (path, summary text).

    diffusers layout: a ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``
    (what ``pipe.load_lora_weights`` reads); kohya layout: a ``.safetensors`` file.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        if layout == "kohya":
            raise ConversionError(f"{dst.name}: kohya LoRA files are .safetensors")
        dst = dst / LORA_WEIGHTS_NAME
    loras = native_to_lora(native, target, rank, max_error)
    state = lora_state_dict(loras, layout)
    rows = summary(loras)
    errors = {f"{c}.{p}": round(x.error, 6) for c, layers in loras.items() for p, x in layers.items()}
    methods = {c: cfg.method for c, cfg in native.configs.items()}
    metadata = {
        "format": "pt",
        "converted_by": f"diffusion-oft {__version__}",
        "diffusion_oft.source": json.dumps({c: cfg.to_dict() for c, cfg in native.configs.items()}, sort_keys=True),
        "diffusion_oft.base_model": base_name or _base_name(native, target),
        "diffusion_oft.max_error": f"{max(errors.values(), default=0.0):.6g}",
        "diffusion_oft.layer_errors": json.dumps(errors, sort_keys=True),
    }
    if layout == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(_peft_metadata(loras), sort_keys=True)
    else:
        metadata["ss_network_module"] = "networks.lora"
        metadata["ss_base_model_version"] = metadata["diffusion_oft.base_model"]
        ranks = sorted({x.rank for layers in loras.values() for x in layers.values()})
        metadata["ss_network_dim"] = str(ranks[-1] if ranks else 0)
        metadata["ss_network_alpha"] = metadata["ss_network_dim"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(state, dst, metadata)
    header = f"{', '.join(f'{c}: {m}' for c, m in methods.items())} -> LoRA ({layout} layout)"
    return dst, header + "\n" + format_summary(rows, dst.stat().st_size)


def lora_file_info(path: str | os.PathLike) -> dict | None:
    """What a LoRA file holds (layout, layers, ranks, our conversion metadata); None if not a LoRA file."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS_NAME
        if not path.is_file():
            return None
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
        layout = lora_layout(keys)
        if layout is None:
            return None
        down = ".lora_A.weight" if layout == "diffusers" else ".lora_down.weight"
        ranks = [f.get_slice(k).get_shape()[0] for k in keys if k.endswith(down)]
    comps: dict[str, int] = {}
    for k in keys:
        if k.endswith(down):
            comp = k.split(".", 1)[0] if layout == "diffusers" else k.split("_", 2)[1]
            comps[comp] = comps.get(comp, 0) + 1
    return {
        "file": str(path),
        "layout": layout,
        "layers": len(ranks),
        "components": comps,
        "rank_min": min(ranks, default=0),
        "rank_max": max(ranks, default=0),
        "size_bytes": path.stat().st_size,
        "converted_by": metadata.get("converted_by"),
        "base_model": metadata.get("diffusion_oft.base_model"),
        "max_error": None if "diffusion_oft.max_error" not in metadata else float(metadata["diffusion_oft.max_error"]),
        "source": json.loads(metadata["diffusion_oft.source"]) if "diffusion_oft.source" in metadata else None,
    }


def lora_refusal(layout: str) -> str:
    """The message for load_adapter on a LoRA file."""
    where = "pipe.load_lora_weights(PATH) of diffusers" if layout == "diffusers" else "ComfyUI / A1111 / Forge"
    return (
        f"a LoRA file ({layout} layout), not an orthogonal adapter: load it with {where} "
        "(diffusion-oft's load_adapter reads orthogonal adapters, no LoRA/LoHa/LoKr; `diffusion-oft info` "
        "describes it)"
    )
