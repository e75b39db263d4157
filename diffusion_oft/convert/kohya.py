"""kohya / LyCORIS adapter files (read by ComfyUI, A1111, Forge), both ways: the tensors (names: ``kohya_names``).

Layout: one safetensors file, keys ``<prefix>_<module path with '.' -> '_'>.<param>`` where the
prefix names the component (``lora_unet``, ``lora_te``; ``lora_te1`` / ``lora_te2`` for SDXL's two
text encoders).  LyCORIS OFT / BOFT (``algo=diag-oft`` / ``boft``) store, per layer:

* ``oft_blocks``: [n, b, b] (OFT) or [m, n, b, b] (BOFT) generator matrices B; the skew matrix is
  Q = B - B^T (not halved) and the rotation r = (I + Q)(I - Q)^-1, acting on the **output** side.
  OFT multiplies the weight by BlockDiag(r)^T (``einsum('k n m, k n ... -> k m ...')``); BOFT
  multiplies it by r per butterfly stage, stage i shuffling coordinates within chunks of
  b * 2**i (the two halves of a chunk interleaved) before the block product.
* ``alpha``: a scalar constraint: LyCORIS, kohya and A1111 rescale Q (all blocks of the layer
  together) to Frobenius norm alpha * out_dim when it is larger; ComfyUI uses alpha itself as the
  radius; A1111 treats 0 as radius 0 (no rotation), the others as "no constraint".
* ``rescale``: optional [out, 1] per-output scale (our ``magnitude``).

Our output-side OFT / BOFT is exactly this map: S = Q^T = -Q for OFT; for BOFT each of our
butterfly levels couples the same coordinate sets as LyCORIS's stage, so blocks map one to one up
to a fixed re-indexing inside each block, and S = Q (re-indexed).  Exports write B = -S/2 (OFT)
or the re-indexed S/2 (BOFT), so Q reproduces S bit for bit, and an ``alpha`` just above the
layer's own norm, which no client's constraint acts on (0 would switch A1111's rotation off).

Newer kohya scripts also write PEFT-style layers with these key names (``oft_R.weight`` for
OFTv2, ``boft_R`` / ``boft_s`` for BOFT); they rotate the input side and are read as PEFT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..config import AdapterConfig
from ..files import AdapterFileError, atomic_save_file
from ..methods import get_method_class
from ..methods.base import method_by
from ..methods.butterfly import butterfly_permutation
from ..methods.cayley import skew_from_triu, triu_from_skew
from .common import ConversionError, NativeAdapter, structure_fields, target_fields, warn
from .kohya_names import (  # noqa: F401 (kohya_key_names, guess_module_path, is_lycoris_like: re-exported)
    LYCORIS_PARAMS,
    PEFT_STYLE,
    guess_module_path,
    is_kohya_key,
    is_lycoris_like,
    kohya_key_names,
    kohya_name,
    module_paths,
    split_key,
)

# ---- LyCORIS BOFT stage layout <-> our butterfly levels -----------------------------------------


def lycoris_block_map(dim: int, block_size: int, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For our butterfly level ``level``: (blk [n], sub [n, b]) such that our block t, row a is
    LyCORIS's block blk[t], row sub[t, a] of the same stage."""
    n = dim // block_size
    perm = butterfly_permutation(dim, block_size, level)
    ours = torch.arange(dim) if perm is None else torch.argsort(perm)  # coordinates our blocks act on
    half_chunk = 2**level * block_size // 2
    # LyCORIS: within each chunk of b * 2**level, the chunk's two halves are interleaved.
    theirs = torch.arange(dim).reshape(-1, 2, half_chunk).transpose(1, 2).reshape(-1)
    position = torch.argsort(theirs)[ours].reshape(n, block_size)
    blk = position // block_size
    if not bool((blk == blk[:, :1]).all()):  # pragma: no cover - a layout change upstream
        raise ConversionError(f"butterfly level {level} of dim {dim}, block {block_size}: layouts do not match")
    return blk[:, 0], position % block_size


def _boft_levels_to_native(q: torch.Tensor) -> torch.Tensor:
    """LyCORIS Q [m, n, b, b] -> our skew matrices [m, n, b, b] (S = Q re-indexed)."""
    m, n, b, _ = q.shape
    out = torch.empty_like(q)
    for level in range(m):
        blk, sub = lycoris_block_map(n * b, b, level)
        out[level] = q[level][blk[:, None, None], sub[:, :, None], sub[:, None, :]]
    return out


def _boft_levels_from_native(s: torch.Tensor) -> torch.Tensor:
    m, n, b, _ = s.shape
    out = torch.empty_like(s)
    for level in range(m):
        blk, sub = lycoris_block_map(n * b, b, level)
        out[level][blk[:, None, None], sub[:, :, None], sub[:, None, :]] = s[level]
    return out


# ---- import ---------------------------------------------------------------------------------------


def _constrained(q: torch.Tensor, alpha: float, out_dim: int, where: str, warned: list) -> torch.Tensor:
    """LyCORIS's constraint: Q scaled to norm alpha * out_dim when larger (0 = no constraint)."""
    if alpha <= 0:
        return q
    norm = torch.norm(q) + 1e-8
    radius = alpha * out_dim
    if float(norm) > alpha and not warned:  # ComfyUI's radius (alpha) acts, so its result differs
        warned.append(True)
        warn(
            f"{where}: alpha={alpha:g} constrains this adapter differently in ComfyUI (radius alpha) than in "
            "LyCORIS / kohya / A1111 (radius alpha * out_dim); diffusion-oft follows LyCORIS"
        )
    return q * radius / norm if float(norm) > radius else q


def kohya_to_native(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    name: str,
    candidates: dict[str, nn.Module] | None = None,
    only: str | None = None,
) -> NativeAdapter:
    """kohya / LyCORIS state dict -> NativeAdapter (one component per key prefix; only the
    component ``only`` when given)."""
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            raise AdapterFileError(f"{name}: key {key!r} has no kohya prefix (lora_unet_, lora_te_, ...)")
        comp, module_name, param = split
        groups.setdefault(comp, {}).setdefault(module_name, {})[param] = tensor
    if only is not None:
        if only not in groups:
            raise AdapterFileError(f"{name}: no {only} layers in this file (it has {sorted(groups)})")
        groups = {only: groups[only]}
    configs, out, base = {}, {}, {}
    for comp, modules in groups.items():
        model = None
        if candidates:
            model = candidates.get(comp)
            if model is None and len(candidates) == 1 and len(groups) > 1:
                raise AdapterFileError(
                    f"{name}: the file holds {sorted(groups)}; pass component=... or load it into the pipeline"
                )
            if model is None and len(candidates) == 1:
                model = next(iter(candidates.values()))
            if model is None:
                raise AdapterFileError(f"{name}: the adapter is for the {comp}, which the target does not have")
        config, tensors_c = _component_to_native(comp, modules, metadata, name, model)
        configs[comp] = config
        out.update(tensors_c)
        base[comp] = {"name_or_path": ""}
    return NativeAdapter(configs, out, "kohya", base)


def _component_to_native(
    comp: str, modules: dict, metadata: dict[str, str], name: str, model: nn.Module | None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    kinds = set()
    for module_name, params in modules.items():
        keys = set(params)
        if "oft_blocks" in keys:
            kinds.add("lycoris")
            extra = keys - set(LYCORIS_PARAMS)
        elif keys & set(PEFT_STYLE):
            kinds.add("peft")
            extra = keys - set(PEFT_STYLE)
        elif "oft_diag" in keys:
            raise AdapterFileError(
                f"{name}: an old LyCORIS OFT file (oft_diag, before LyCORIS 2.0); re-save it with a current LyCORIS"
            )
        elif keys & {"lora_up.weight", "lora_down.weight", "lora_A.weight", "hada_w1_a", "lokr_w1", "diff"}:
            raise AdapterFileError(
                f"{name}: {module_name}.{sorted(keys)[0]} belongs to a LoRA/LoHa/LoKr or full-delta file, "
                "not an orthogonal (OFT/BOFT) adapter"
            )
        else:
            extra = keys
        if extra:
            raise AdapterFileError(f"{name}: unsupported tensor {module_name}.{sorted(extra)[0]!r} in an OFT file")
    if len(kinds) > 1:
        raise AdapterFileError(f"{name}: mixes LyCORIS oft_blocks layers with PEFT-style layers")
    paths = module_paths(modules, model, comp, name)
    if kinds == {"peft"}:
        return _peft_style_to_native(comp, modules, metadata, name, model, paths)

    ndims = {p["oft_blocks"].ndim for p in modules.values()}
    if ndims not in ({3}, {4}):
        raise AdapterFileError(f"{name}: oft_blocks must all be 3-d (OFT) or all 4-d (BOFT)")
    boft = ndims == {4}
    if model is not None:
        from .common import linear_dims

        dims = linear_dims(model)
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    ms, warned = set(), []
    rescaled = any("rescale" in p for p in modules.values())
    for module_name, params in modules.items():
        path = paths[module_name]
        blocks = params["oft_blocks"].float()
        if not boft:
            blocks = blocks.unsqueeze(0)
        m, n, b, b2 = blocks.shape
        if b != b2:
            raise AdapterFileError(f"{name}: {module_name}.oft_blocks has non-square blocks {list(blocks.shape)}")
        if model is not None:
            out_dim = dims[path][1]
            if out_dim != n * b:
                raise AdapterFileError(
                    f"{name}: {module_name}.oft_blocks covers {n * b} outputs but the layer has {out_dim}"
                )
        alpha = float(params["alpha"]) if "alpha" in params else 0.0
        q = _constrained(blocks - blocks.transpose(-1, -2), alpha, n * b, name, warned)
        skew = _boft_levels_to_native(q) if boft else -q  # OFT: the weight gets r^T = Cayley(-Q)
        vec = triu_from_skew(skew)
        out[f"{comp}.{path}.skew"] = (vec if boft else vec[0]).contiguous()
        if rescaled:
            scale = params.get("rescale")
            out[f"{comp}.{path}.magnitude"] = torch.ones(n * b) if scale is None else scale.float().reshape(-1)
        shapes[path] = (n, b)
        ms.add(m)
    if len(ms) > 1:
        raise AdapterFileError(f"{name}: BOFT layers with different numbers of butterfly stages {sorted(ms)}")
    kwargs: dict = {"side": "output", "cayley_mode": "exact", "magnitude": rescaled}
    if boft:
        kwargs.update(method=method_by(lycoris_algo="boft").name, n_butterfly_factors=ms.pop())
    else:
        kwargs["method"] = method_by(lycoris_algo="diag-oft").name
    kwargs.update(structure_fields(shapes, name))
    kwargs["extra"] = {"converted_from": "lycoris"}
    kwargs.update(target_fields(list(shapes), kwargs, model))
    return AdapterConfig(**kwargs), out


def _network_args(metadata: dict[str, str]) -> dict:
    try:
        args = json.loads(metadata.get("ss_network_args", "{}") or "{}")
    except ValueError:
        return {}
    return args if isinstance(args, dict) else {}


def _peft_style_to_native(comp, modules, metadata, name, model, paths):
    """kohya's newer OFTv2 / BOFT networks: PEFT math under kohya names."""
    from .peft import peft_to_native

    state, args = {}, _network_args(metadata)
    for module_name, params in modules.items():
        for param, tensor in params.items():
            state[f"{paths[module_name]}.{param}"] = tensor
    is_oft = any("oft_R.weight" in p for p in modules.values())
    truthy = ("1", "true", "yes", "y", "on")
    if is_oft:
        peft_config = {
            "peft_type": "OFT",
            # kohya's OFTv2 network always runs PEFT's default series (5 terms)
            "use_cayley_neumann": True,
            "num_cayley_neumann_terms": 5,
            "peft_version": "0.18.0",
            "coft": str(args.get("oft_coft", args.get("coft", "false"))).lower() in truthy,
            "eps": float(args.get("coft_eps", 6e-5)),
            "block_share": str(args.get("oft_block_share", args.get("block_share", "false"))).lower() in truthy,
        }
    else:
        peft_config = {"peft_type": "BOFT"}
    native = peft_to_native(
        state, peft_config, name, {comp: model} if model is not None else None, comp, source_format="kohya-peft"
    )
    return native.configs[comp], native.tensors


# ---- export ---------------------------------------------------------------------------------------


def native_to_kohya(native: NativeAdapter) -> dict[str, torch.Tensor]:
    """Output-side OFT / BOFT (exact Cayley) -> LyCORIS ``oft_blocks`` state dict."""
    state: dict[str, torch.Tensor] = {}
    components = list(native.configs)
    for comp, config in native.configs.items():
        where = f"{comp} adapter ({config.method}, side={config.side})"
        algo = get_method_class(config.method).lycoris_algo
        if algo is None:
            raise ConversionError(
                f"{where}: kohya/LyCORIS files have no {config.method}; use --to diff (exact full weight deltas, "
                "read by ComfyUI and A1111) or --to merged"
            )
        if config.side != "output":
            raise ConversionError(
                f"{where}: LyCORIS oft_blocks rotate the output side, and an input-side rotation cannot be rewritten "
                "as output-side blocks; use --to lora or --to diff (read by ComfyUI and A1111), or train with "
                "--side output (AdapterConfig(side='output'))"
            )
        if config.cayley_mode != "exact":
            raise ConversionError(
                f"{where}: LyCORIS uses the exact Cayley transform; this adapter uses the Cayley-Neumann series, "
                "use --to diff instead"
            )
        if config.magnitude and algo == "diag-oft":
            warn(
                f"{where}: the per-output scale is written as LyCORIS 'rescale'; LyCORIS and A1111 >= 1.9 apply it, "
                "ComfyUI (0.3.6x) and A1111 < 1.9 ignore it for OFT (the result is then off there): use --to diff "
                "or --to lora for those"
            )
        for path, params in native.layers(comp).items():
            name = kohya_name(comp, path, components)
            vec = params["skew"].float()
            s = skew_from_triu(vec, _block_size(vec.shape[-1]))
            # OFT: Q = B - B^T = -S (the weight gets r^T);  BOFT: Q = S re-indexed per stage
            blocks = -0.5 * s if algo == "diag-oft" else 0.5 * _boft_levels_from_native(s)
            norm = torch.norm(s)
            state[f"{name}.oft_blocks"] = blocks.contiguous()
            # Above the layer's own norm: no client's constraint (radius alpha or alpha * out_dim) acts.
            state[f"{name}.alpha"] = (2 * norm + 1e-6).reshape(()).float()
            if config.magnitude:
                state[f"{name}.rescale"] = params["magnitude"].float().reshape(-1, 1).contiguous()
    return state


def _block_size(n_elements: int) -> int:
    from .peft_math import block_size_from_triangle

    return block_size_from_triangle(n_elements, "skew")


def write_kohya(native: NativeAdapter, path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path.name}: kohya/LyCORIS files are .safetensors")
    state = native_to_kohya(native)
    algos = {get_method_class(c.method).lycoris_algo for c in native.configs.values()}
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": algos.pop() if len(algos) == 1 else "diag-oft"}),
        "converted_by": f"diffusion-oft {__version__}",
    }
    atomic_save_file(state, path, metadata)
    return path
