"""The tensor math of PEFT's OFT / BOFT / HRA layers against ours (``convert.peft`` does the names).

Each importer takes {module path: tensor(s)} of one PEFT type, and returns our tensors per module path
{path: {parameter: tensor}}, the (n, b) block structure per path, and the AdapterConfig fields it implies;
each exporter takes one component's {path: {parameter: tensor}} and returns PEFT's {path: {param: tensor}}.

* OFT (v2) ``oft_R.weight`` [n, b(b-1)/2], strict upper triangles of Q.  Exact mode: (I - Q)(I + Q)^-1,
  i.e. S = -Q.  Cayley-Neumann mode with t terms: I + 2Q + ... + 2Q^(t-2) + Q^(t-1) =
  (I + Q)(I + Q + ... + Q^(t-2)), i.e. S = +Q and our ``neumann_terms`` k = t - 2.
* BOFT ``boft_R`` [m, n, b, b] (full matrices; PEFT uses their skew part S' = (A - A^T)/2) and ``boft_s``
  [out, 1] (our ``magnitude``).  PEFT's Cayley is (I - S')(I + S')^-1, ours (I + S)(I - S)^-1: S = -S'.
  The butterfly permutations share one index layout (``methods/butterfly.py``): factor i is our level i.
* HRA ``hra_u`` [d_in, r]: column i is u_i of W' = W H_1 ... H_r; ours is ``u_in`` [r, 1, d_in].
"""

from __future__ import annotations

import torch

from ..files import AdapterFileError
from ..methods.cayley import num_skew_params, skew_from_triu, triu_from_skew
from .common import ConversionError, warn

Layers = dict[str, dict[str, torch.Tensor]]


def block_size_from_triangle(n_elements: int, key: str) -> int:
    b = int(round((1 + (1 + 8 * n_elements) ** 0.5) / 2))
    if num_skew_params(b) != n_elements:
        raise AdapterFileError(f"{key}: {n_elements} numbers per block is not b(b-1)/2 for any block size b")
    return b


def coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's COFT projection of OFT parameters (applied by PEFT in every forward pass)."""
    q = skew_from_triu(vec, block_size)
    radius = eps / torch.sqrt(torch.tensor(float(q.shape[0])))
    norms = torch.norm(q, dim=(1, 2), keepdim=True)
    out = torch.where(norms <= radius, q, radius * (q / norms))
    rows, cols = torch.triu_indices(block_size, block_size, offset=1)
    return out[:, rows, cols]


# ---- import ---------------------------------------------------------------------------------------


def oft_from_peft(
    oft: dict[str, torch.Tensor], cfg: dict, name: str, in_dims: dict[str, int], has_config: bool
) -> tuple[Layers, dict[str, tuple[int, int]], dict]:
    """PEFT OFT ``oft_R.weight`` per path -> (our ``skew``, structure, config fields).  ``in_dims``: the
    input widths of the paths the model at hand has (for block_share adapters)."""
    neumann = bool(cfg.get("use_cayley_neumann", True))
    terms = int(cfg.get("num_cayley_neumann_terms", 5))
    if not has_config:
        warn(f"{name}: no adapter_config.json; assuming PEFT's OFT defaults (Cayley-Neumann, 5 terms)")
    if neumann and terms < 3:
        raise AdapterFileError(
            f"{name}: num_cayley_neumann_terms={terms}; diffusion-oft represents PEFT's series from 3 terms on"
        )
    coft = bool(cfg.get("coft", False))
    eps = float(cfg.get("eps", 6e-5))
    out: Layers = {}
    shapes: dict[str, tuple[int, int]] = {}
    rows_seen = set()
    for path, vec in oft.items():
        b = block_size_from_triangle(vec.shape[-1], path)
        n = vec.shape[0]
        if coft:
            vec = coft_project(vec, b, eps)
            rows_seen.add(n)
        if n == 1 and (cfg.get("block_share") or in_dims.get(path, 0) > b):
            if path not in in_dims:
                raise ConversionError(
                    f"{name}: a block_share adapter; give the base model so the shared block can be repeated"
                )
            n = in_dims[path] // b
            vec = vec.expand(n, -1)
        shapes[path] = (n, b)
        out[path] = {"skew": (vec if neumann else -vec).contiguous().clone()}
    fields: dict = {"cayley_mode": "neumann" if neumann else "exact"}
    if neumann:
        fields["neumann_terms"] = terms - 2
    if coft and len(rows_seen) == 1:
        fields["coft_eps"] = eps / float(rows_seen.pop()) ** 0.5
    elif coft:
        warn(f"{name}: PEFT's COFT radius depends on each layer's block count; the loaded adapter has no COFT")
    if cfg.get("module_dropout"):
        fields["dropout"] = float(cfg["module_dropout"])
    return out, shapes, fields


def boft_from_peft(
    boft_r: dict[str, torch.Tensor], boft_s: dict[str, torch.Tensor], cfg: dict, name: str
) -> tuple[Layers, dict[str, tuple[int, int]], dict]:
    """PEFT BOFT ``boft_R`` (+ ``boft_s``) per path -> (our ``skew`` (+ ``magnitude``), structure, fields)."""
    ms = {r.shape[0] for r in boft_r.values()}
    if len(ms) != 1:
        raise AdapterFileError(f"{name}: layers with different numbers of butterfly factors {sorted(ms)}")
    m = ms.pop()
    magnitude = any(not bool((s == 1).all()) for s in boft_s.values())
    out: Layers = {}
    shapes: dict[str, tuple[int, int]] = {}
    for path, mat in boft_r.items():
        if mat.ndim != 4 or mat.shape[-1] != mat.shape[-2]:
            raise AdapterFileError(f"{name}: boft_R of {path!r} has shape {list(mat.shape)}; expected [m, n, b, b]")
        _, n, b, _ = mat.shape
        shapes[path] = (n, b)
        out[path] = {"skew": -triu_from_skew(mat).contiguous()}
        if magnitude:
            s = boft_s.get(path)
            if s is None:
                raise AdapterFileError(f"{name}: {path!r} has boft_R but no boft_s")
            out[path]["magnitude"] = s.reshape(-1).clone()
    fields = {"n_butterfly_factors": m, "magnitude": magnitude, "cayley_mode": "exact"}
    if cfg.get("boft_dropout"):
        fields["dropout"] = float(cfg["boft_dropout"])
    return out, shapes, fields


def hra_from_peft(
    hra_u: dict[str, torch.Tensor], cfg: dict, name: str
) -> tuple[Layers, dict[str, tuple[int, int]], dict]:
    """PEFT HRA ``hra_u`` [d_in, r] per path -> (our ``u_in`` [r, 1, d_in], structure, config fields)."""
    if cfg.get("apply_GS"):
        raise AdapterFileError(
            f"{name}: a PEFT HRA adapter with apply_GS=True (Gram-Schmidt reflections), which diffusion-oft does "
            "not implement; merge it with PEFT and use the merged model"
        )
    ranks = {u.shape[-1] for u in hra_u.values()}
    if len(ranks) != 1 or any(u.ndim != 2 for u in hra_u.values()):
        raise AdapterFileError(f"{name}: HRA layers with different ranks or shapes {sorted(ranks)}")
    out: Layers = {}
    shapes: dict[str, tuple[int, int]] = {}
    for path, u in hra_u.items():
        d, r = u.shape
        out[path] = {"u_in": u.t().reshape(r, 1, d).contiguous().clone()}
        shapes[path] = (1, d)
    return out, shapes, {"n_reflections": ranks.pop()}


# ---- export ---------------------------------------------------------------------------------------


def oft_to_peft(layers: Layers, exact: bool) -> Layers:
    """Our OFT ``skew`` -> PEFT's ``oft_R.weight`` (exact: PEFT computes (I - Q)(I + Q)^-1, so Q = -S;
    Neumann: the same sign as ours)."""
    return {
        path: {"oft_R.weight": (-p["skew"] if exact else p["skew"]).float().contiguous()} for path, p in layers.items()
    }


def boft_to_peft(layers: Layers, m: int, out_dims: dict[str, tuple[int, int]] | None) -> tuple[Layers, list[str]]:
    """Our OFT / BOFT ``skew`` (+ ``magnitude``) -> PEFT's ``boft_R`` (+ ``boft_s``); also the paths whose
    ``boft_s`` (all ones) is left out because their output sizes are unknown."""
    state: Layers = {}
    missing_scale = []
    for path, params in layers.items():
        skew = params["skew"].float()
        vec = skew.reshape(m, skew.shape[-2], skew.shape[-1])
        b = block_size_from_triangle(vec.shape[-1], path)
        state[path] = {"boft_R": (-skew_from_triu(vec, b)).contiguous()}  # PEFT's S' = -S
        if "magnitude" in params:
            state[path]["boft_s"] = params["magnitude"].float().reshape(-1, 1).contiguous()
        elif out_dims and path in out_dims:
            state[path]["boft_s"] = torch.ones(out_dims[path][1], 1)
        else:
            missing_scale.append(path)
    return state, missing_scale


def hra_to_peft(layers: Layers) -> Layers:
    """Our HRA ``u_in`` [r, 1, d_in] -> PEFT's ``hra_u`` [d_in, r]."""
    return {path: {"hra_u": p["u_in"].float().flatten(1).t().contiguous()} for path, p in layers.items()}
