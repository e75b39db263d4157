"""PEFT OFT / BOFT adapters (``adapter_model.safetensors`` + ``adapter_config.json``), both ways.

PEFT rotates the layer's **input** side, like diffusion-oft's default ``side="input"``:

* BOFT keys ``base_model.model.<path>.boft_R`` [m, n, b, b] (full matrices, PEFT uses their skew
  part S' = (A - A^T)/2) and ``.boft_s`` [out, 1] (per-output scale, our ``magnitude``).  PEFT's
  Cayley is (I - S')(I + S')^-1, ours (I + S)(I - S)^-1, so S = -S'.  The butterfly permutations
  are the same index layout (``methods/butterfly.py``), so factor i maps to our level i.
* OFT (v2) keys ``.oft_R.weight`` [n, b(b-1)/2] (strict upper triangles of Q).  Exact mode:
  (I - Q)(I + Q)^-1, i.e. S = -Q.  Cayley-Neumann mode with t terms: I + 2Q + ... + 2Q^(t-2) +
  Q^(t-1) = (I + Q)(I + Q + ... + Q^(t-2)), i.e. S = +Q and our ``neumann_terms`` k = t - 2.
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
from ..files import AdapterFileError, atomic_save_file, read_adapter_file
from ..methods import get_method_class
from ..methods.base import method_by
from ..methods.cayley import num_skew_params, skew_from_triu, triu_from_skew
from .common import ConversionError, NativeAdapter, resolve_component, structure_fields, target_fields, warn

PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# PEFT 0.18 changed its Cayley-Neumann series; older Neumann adapters use another formula.
MIN_NEUMANN_VERSION = (0, 18)
_OFT_KEY = re.compile(r"^(?P<path>.+)\.oft_R(?:\.[^.]+)?\.weight$")
_BOFT_KEY = re.compile(r"^(?P<path>.+)\.(?P<param>boft_R|boft_s)(?:\.[^.]+)?$")


def is_peft_key(key: str) -> bool:
    return bool(_OFT_KEY.match(key) or _BOFT_KEY.match(key))


def block_size_from_triangle(n_elements: int, key: str) -> int:
    b = int(round((1 + (1 + 8 * n_elements) ** 0.5) / 2))
    if num_skew_params(b) != n_elements:
        raise AdapterFileError(f"{key}: {n_elements} numbers per block is not b(b-1)/2 for any block size b")
    return b


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
    from ..files import COMPONENT_NAMES

    head, _, rest = path.partition(".")
    if head in COMPONENT_NAMES and rest:
        return head, rest
    return None, path


def coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's COFT projection of OFT parameters (applied by PEFT in every forward pass)."""
    q = skew_from_triu(vec, block_size)
    radius = eps / torch.sqrt(torch.tensor(float(q.shape[0])))
    norms = torch.norm(q, dim=(1, 2), keepdim=True)
    out = torch.where(norms <= radius, q, radius * (q / norms))
    rows, cols = torch.triu_indices(block_size, block_size, offset=1)
    return out[:, rows, cols]


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
    peft_type = str(cfg.get("peft_type", "")).upper() or None
    oft, boft_r, boft_s = {}, {}, {}
    for key, tensor in tensors.items():
        inner = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if m := _OFT_KEY.match(inner):
            oft[m["path"]] = tensor.float()
        elif m := _BOFT_KEY.match(inner):
            (boft_r if m["param"] == "boft_R" else boft_s)[m["path"]] = tensor.float()
        else:
            raise AdapterFileError(
                f"{name}: tensor {key!r} is not an OFT/BOFT adapter parameter (trained biases or "
                "modules_to_save cannot be represented by an orthogonal adapter)"
            )
    if oft and (boft_r or boft_s):
        raise AdapterFileError(f"{name}: mixes PEFT OFT and BOFT tensors")
    if boft_s and set(boft_s) - set(boft_r):
        raise AdapterFileError(f"{name}: boft_s without boft_R for {sorted(set(boft_s) - set(boft_r))[0]!r}")
    layers = oft or boft_r
    if not layers:
        raise AdapterFileError(f"{name}: no PEFT OFT/BOFT tensors")
    if peft_type and peft_type not in ("OFT", "BOFT"):
        raise AdapterFileError(f"{name}: a PEFT {peft_type} adapter, not OFT or BOFT")

    # Component: a prefix in the keys, else the candidate that has all the modules.
    split = {p: _split_component(p) for p in layers}
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
    comp = comp or "unet"
    dims = {}
    if module is not None:
        from .common import linear_dims

        dims = linear_dims(module)
        missing = [p for p in paths.values() if p not in dims]
        if missing:
            raise AdapterFileError(
                f"{name}: module {missing[0]!r} is not a linear layer of this {type(module).__name__} "
                "(a file for another base model, or an adapter on a convolution, which diffusion-oft does not adapt)"
            )

    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    kwargs: dict = {"side": "input"}
    if oft:
        neumann = bool(cfg.get("use_cayley_neumann", True))
        terms = int(cfg.get("num_cayley_neumann_terms", 5))
        if peft_config is None:
            warn(f"{name}: no {CONFIG_NAME}; assuming PEFT's OFT defaults (Cayley-Neumann, 5 terms)")
        elif neumann and _version_tuple(cfg.get("peft_version")) < MIN_NEUMANN_VERSION:
            raise AdapterFileError(
                f"{name}: a Cayley-Neumann OFT adapter from PEFT < 0.18, whose series differs from the current "
                "one; load it with that PEFT version and save it with exact Cayley, or retrain"
            )
        if neumann and terms < 3:
            raise AdapterFileError(
                f"{name}: num_cayley_neumann_terms={terms}; diffusion-oft represents PEFT's series from 3 terms on"
            )
        coft = bool(cfg.get("coft", False))
        eps = float(cfg.get("eps", 6e-5))
        rows_seen = set()
        for path, vec in oft.items():
            b = block_size_from_triangle(vec.shape[-1], path)
            n = vec.shape[0]
            if coft:
                vec = coft_project(vec, b, eps)
                rows_seen.add(n)
            if n == 1 and (cfg.get("block_share") or (paths[path] in dims and dims[paths[path]][0] > b)):
                if paths[path] not in dims:
                    raise ConversionError(
                        f"{name}: a block_share adapter; give the base model so the shared block can be repeated"
                    )
                n = dims[paths[path]][0] // b
                vec = vec.expand(n, -1)
            shapes[paths[path]] = (n, b)
            out[f"{comp}.{paths[path]}.skew"] = (vec if neumann else -vec).contiguous().clone()
        kwargs.update(method=method_by(peft_type="OFT").name, cayley_mode="neumann" if neumann else "exact")
        if neumann:
            kwargs["neumann_terms"] = terms - 2
        if coft and len(rows_seen) == 1:
            kwargs["coft_eps"] = eps / float(rows_seen.pop()) ** 0.5
        elif coft:
            warn(f"{name}: PEFT's COFT radius depends on each layer's block count; the loaded adapter has no COFT")
        if cfg.get("module_dropout"):
            kwargs["dropout"] = float(cfg["module_dropout"])
    else:
        ms = {r.shape[0] for r in boft_r.values()}
        if len(ms) != 1:
            raise AdapterFileError(f"{name}: layers with different numbers of butterfly factors {sorted(ms)}")
        m = ms.pop()
        magnitude = any(not bool((s == 1).all()) for s in boft_s.values())
        for path, mat in boft_r.items():
            if mat.ndim != 4 or mat.shape[-1] != mat.shape[-2]:
                raise AdapterFileError(f"{name}: boft_R of {path!r} has shape {list(mat.shape)}; expected [m, n, b, b]")
            _, n, b, _ = mat.shape
            shapes[paths[path]] = (n, b)
            out[f"{comp}.{paths[path]}.skew"] = -triu_from_skew(mat).contiguous()
            if magnitude:
                s = boft_s.get(path)
                if s is None:
                    raise AdapterFileError(f"{name}: {path!r} has boft_R but no boft_s")
                out[f"{comp}.{paths[path]}.magnitude"] = s.reshape(-1).clone()
        kwargs.update(
            method=method_by(peft_type="BOFT").name, n_butterfly_factors=m, magnitude=magnitude, cayley_mode="exact"
        )
        if cfg.get("boft_dropout"):
            kwargs["dropout"] = float(cfg["boft_dropout"])
    kwargs.update(structure_fields(shapes, name))
    kwargs["extra"] = {"converted_from": source_format}
    kwargs.update(target_fields(list(shapes), kwargs, module))
    config = AdapterConfig(**kwargs)
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
    if peft_type == "OFT":
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
    state: dict[str, torch.Tensor] = {}
    layers = native.layers(comp)
    missing_scale = []
    for path, params in layers.items():
        skew = params["skew"].float()
        key = f"{PEFT_PREFIX}{path}"
        if peft_type == "OFT":
            # exact: PEFT computes (I - Q)(I + Q)^-1, so Q = -S; Neumann: same sign as ours
            state[f"{key}.oft_R.weight"] = (-skew if config.cayley_mode == "exact" else skew).contiguous()
            continue
        vec = skew.reshape(m, skew.shape[-2], skew.shape[-1])
        b = int(round((1 + (1 + 8 * vec.shape[-1]) ** 0.5) / 2))
        state[f"{key}.boft_R"] = (-skew_from_triu(vec, b)).contiguous()  # PEFT's S' = -S
        if "magnitude" in params:
            state[f"{key}.boft_s"] = params["magnitude"].float().reshape(-1, 1).contiguous()
        elif dims and path in dims:
            state[f"{key}.boft_s"] = torch.ones(dims[path][1], 1)
        else:
            missing_scale.append(path)
    if missing_scale:
        warn(
            f"{where}: boft_s (all ones) left out for {len(missing_scale)} layers because their output sizes are "
            "unknown (give the base model to write them); PEFT then keeps its initial value 1"
        )
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
