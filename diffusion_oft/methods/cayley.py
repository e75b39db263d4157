"""Skew-symmetric generators and the Cayley transform, batched over blocks.

Sign convention (used everywhere in diffusion-oft):

    R = Cayley(S) = (I + S)(I - S)^-1 = (I - S)^-1 (I + S)        S = -S^T

so that R ~ I + 2S for small S.  The exact mode computes (I - S)^-1 to float32 precision:
  * by the doubling product X_j = (I + S)(I + S^2)(I + S^4)...(I + S^(2^(j-1))) = (I - S)^-1 (I - S^(2^j)):
    no LAPACK call, 2j - 1 batched matmuls for R.  For skew-symmetric S, |(I - S)^-1|_2 <= 1, so
    |X_j - (I - S)^-1|_2 <= |S|_2^(2^j): ``series_factors`` picks the smallest j that puts this
    below 2^-26 (under float32 rounding) for the largest block, from |S|_2 <= |S|_F / sqrt(2).
    Up to SERIES_FACTORS = 5 factors (9 matmuls) for |S|_F <= SERIES_MAX_NORM = 0.5; small
    generators need fewer (|S|_F = 0.1: 3 factors; S = 0, the initialisation: none, R = I + S).
    Callers that know the norms (``series_ok``; the methods check |S|_F once per parameter change)
    get it;
  * otherwise by ``torch.linalg.solve`` (large blocks one per call on CPU: see ``linalg``).
On CPU a batched LU pays ~15 us per matrix however small, so the product is several times faster
for the 8x8 / 32x32 blocks of BOFT / OFT.  Its length depends on the largest block built with it,
so a block's result may differ with its batch, by less than float32 rounding.  The Neumann mode
(OFTv2) replaces (I - S)^-1 by the truncated series I + S + S^2 + ... + S^k; both modes agree up
to its error, O(|S|^(k+1)).
"""

from __future__ import annotations

import math

import torch

from .linalg import solve

__all__ = ["num_skew_params", "skew_from_triu", "triu_from_skew", "cayley", "series_factors", "SERIES_MAX_NORM"]

# The doubling product is used for |S|_F <= SERIES_MAX_NORM (|S|_2 <= 0.354): SERIES_FACTORS factors
# leave a remainder |S|_2^(2^SERIES_FACTORS) <= 4e-15, below float32 rounding.
SERIES_MAX_NORM = 0.5
SERIES_FACTORS = 5
SERIES_TOLERANCE = 2.0**-26  # bound on |X_j - (I - S)^-1|_2


def series_factors(max_frobenius: float) -> int:
    """Doubling factors j for blocks with |S|_F <= max_frobenius (<= SERIES_MAX_NORM): the smallest j
    with (|S|_F / sqrt(2))^(2^j) <= SERIES_TOLERANCE (0 when S = 0)."""
    if max_frobenius > SERIES_MAX_NORM:
        raise ValueError(f"the doubling product needs |S|_F <= {SERIES_MAX_NORM}, got {max_frobenius:.3g}")
    norm_2 = max_frobenius / math.sqrt(2.0)
    factors = 0
    while norm_2 ** (2**factors) > SERIES_TOLERANCE:
        factors += 1
    return factors


def num_skew_params(block_size: int) -> int:
    """Numbers stored per skew-symmetric block: its strict upper triangle, b(b-1)/2."""
    return block_size * (block_size - 1) // 2


def _triu_indices(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=device)
    return rows, cols


class _SkewFromTriu(torch.autograd.Function):
    """Strict upper triangles -> skew-symmetric matrices by two flat ``index_copy_`` (one pass, no
    advanced indexing); backward: two flat ``index_select`` (upper minus lower entries of the grad)."""

    @staticmethod
    def forward(ctx, vec: torch.Tensor, block_size: int) -> torch.Tensor:
        rows, cols = _triu_indices(block_size, vec.device)
        upper, lower = rows * block_size + cols, cols * block_size + rows
        flat = vec.reshape(math.prod(vec.shape[:-1]), vec.shape[-1])
        out = flat.new_zeros(flat.shape[0], block_size * block_size)
        out.index_copy_(1, upper, flat)
        out.index_copy_(1, lower, -flat)
        ctx.save_for_backward(upper, lower)
        return out.view(*vec.shape[:-1], block_size, block_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        upper, lower = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-2] * grad.shape[-1])
        out = flat.index_select(1, upper) - flat.index_select(1, lower)
        return out.view(*grad.shape[:-2], upper.numel()), None


def skew_from_triu(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., b(b-1)/2) strict upper triangles -> (..., b, b) skew-symmetric matrices."""
    return _SkewFromTriu.apply(vec, block_size)


def triu_from_skew(skew: torch.Tensor) -> torch.Tensor:
    """(..., b, b) matrices -> strict upper triangle of their skew part 1/2 (A - A^T)."""
    block_size = skew.shape[-1]
    rows, cols = _triu_indices(block_size, skew.device)
    skew = 0.5 * (skew - skew.transpose(-1, -2))
    return skew[..., rows, cols]


class _ExactCayley(torch.autograd.Function):
    """R = (I + S) X with X = (I - S)^-1, by the doubling product X_j (``factors`` = j) or, for
    ``factors`` None, one batched solve; the backward needs neither.

    dR = 2 X dS X (as I + R = 2X),  so  dL/dS = 2 X^T G X^T: two batched matmuls (autograd through
    ``linalg.solve`` would run another LU solve); with X = I (j = 0), 2 G.
    """

    @staticmethod
    def forward(ctx, skew: torch.Tensor, factors: int | None) -> torch.Tensor:
        eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
        ctx.kind = "solve" if factors is None else "identity" if factors == 0 else "product"
        if factors is None:
            rotation = solve(eye - skew, eye + skew)
            ctx.save_for_backward(rotation)  # X = (R + I) / 2, formed in the backward only
            return rotation
        if factors == 0:  # |S| under float32 rounding (S = 0 at init): X = I
            return skew + eye
        # X_j = (I + S)(I + S^2)...(I + S^(2^(j-1))); all factors commute.
        inverse = skew + eye
        power = skew
        for _ in range(factors - 1):
            power = torch.bmm(power, power)
            inverse = torch.bmm(inverse, power).add_(inverse)  # X (I + P)
        rotation = torch.bmm(skew, inverse).add_(inverse)  # (I + S) X
        ctx.save_for_backward(inverse)
        return rotation

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.kind == "identity":
            return 2.0 * grad, None
        (saved,) = ctx.saved_tensors
        if ctx.kind == "solve":
            eye = torch.eye(saved.shape[-1], device=saved.device, dtype=saved.dtype)
            saved = 0.5 * (saved + eye)  # X from R
        xt = saved.mT  # a transposed view: bmm reads it without a copy
        return torch.bmm(torch.bmm(xt, grad), xt).mul_(2.0), None


def cayley(
    skew: torch.Tensor,
    mode: str = "exact",
    neumann_terms: int = 5,
    series_ok: bool = False,
    factors: int | None = None,
) -> torch.Tensor:
    """Batched Cayley transform of skew-symmetric (..., b, b) matrices, computed in float32.

    mode: "exact" or "neumann" (k-term series for (I - S)^-1, k = neumann_terms).
    series_ok: the caller guarantees |S|_F <= SERIES_MAX_NORM for every block, so the exact mode
    may use the matmul-only doubling product (see module doc) instead of a solve; ``factors``: its
    length, from ``series_factors`` of the largest |S|_F (default: SERIES_FACTORS, any such S).
    Returns float32 (..., b, b) matrices, orthogonal (to float32 precision) in exact mode.
    """
    shape = skew.shape
    skew = skew.float().reshape(-1, shape[-1], shape[-1])  # (batch, b, b): plain bmm, no broadcasting
    if mode == "exact":
        # R = (I - S)^-1 (I + S): the doubling product or one batched solve, no explicit inverse.
        length = (SERIES_FACTORS if factors is None else factors) if series_ok else None  # None: solve
        return _ExactCayley.apply(skew, length).view(shape)
    if mode != "neumann":
        raise ValueError(f"unknown Cayley mode {mode!r}; use 'exact' or 'neumann'")
    eye = torch.eye(shape[-1], device=skew.device, dtype=skew.dtype)
    # R = (I + S)(I + S + ... + S^k).
    if neumann_terms % 2 == 1:
        # k odd: I + S + ... + S^k = (I + S)(I + S^2 + ... + S^(k-1)), so R = (I + 2S + S^2) P(S^2) with
        # P(Y) = I + Y + ... + Y^((k-1)/2), Horner in Y = S^2: (k + 1) / 2 matmuls instead of k + 1.
        square = torch.bmm(skew, skew)
        head = torch.add(square, skew, alpha=2.0) + eye  # (I + S)^2
        if neumann_terms == 1:
            return head.view(shape)
        poly = square + eye
        for _ in range((neumann_terms - 1) // 2 - 1):
            poly = torch.bmm(square, poly) + eye
        return torch.bmm(head, poly).view(shape)
    # k even: Horner-style I + S(I + S(I + ...)).
    series = skew + eye
    for _ in range(neumann_terms - 1):
        series = torch.bmm(skew, series) + eye
    return (series + torch.bmm(skew, series)).view(shape)
