"""Skew-symmetric generators and the Cayley transform, batched over blocks.

Sign convention (used everywhere in diffusion-oft):

    R = Cayley(S) = (I + S)(I - S)^-1 = (I - S)^-1 (I + S)        S = -S^T

so that R ~ I + 2S for small S.  The exact mode computes (I - S)^-1 to float32 precision:
  * by the doubling product (I - S)^-1 = (I + S)(I + S^2)(I + S^4)(I + S^8)(I + S^16) (+ a
    remainder of order |S|^32): 9 batched matmuls, no LAPACK call, valid when every block has
    |S|_2 <= SERIES_MAX_NORM (0.5: remainder <= 2e-10).  Callers that know this (``series_ok``;
    the methods check |S|_F once per parameter change) get it;
  * otherwise by ``torch.linalg.solve`` (large blocks one per call on CPU: see ``linalg``).
On CPU a batched LU pays ~15 us per matrix however small, so the product is several times faster
for the 8x8 / 32x32 blocks of BOFT / OFT.  Its length is fixed, so a block's result never depends
on which other blocks are in the batch.  The Neumann mode (OFTv2) replaces (I - S)^-1 by the
truncated series I + S + S^2 + ... + S^k; both modes agree up to its error, O(|S|^(k+1)).
"""

from __future__ import annotations

import math

import torch

from .linalg import solve

__all__ = ["num_skew_params", "skew_from_triu", "triu_from_skew", "cayley", "SERIES_MAX_NORM"]

# The doubling product is used for |S|_2 <= SERIES_MAX_NORM: SERIES_FACTORS factors leave a remainder
# |S|^(2^SERIES_FACTORS) <= 0.5^32 = 2.3e-10, below float32 rounding.
SERIES_MAX_NORM = 0.5
SERIES_FACTORS = 5


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
    """R = (I - S)^-1 (I + S) by the doubling product (``series``) or one batched solve; the
    backward needs neither.

    With X = (I - S)^-1 = (R + I) / 2:  dR = 2 X dS X,  so  dL/dS = 2 X^T G X^T = 1/2 (R + I)^T G (R + I)^T,
    two batched matmuls (autograd through ``linalg.solve`` would run another LU solve).
    """

    @staticmethod
    def forward(ctx, skew: torch.Tensor, series: bool) -> torch.Tensor:
        eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
        if not series:
            rotation = solve(eye - skew, eye + skew)
        else:
            # X = (I + S)(I + S^2)...(I + S^(2^(j-1))) = (I - S)^-1 - O(|S|^(2^j)); all factors commute.
            inverse = skew + eye
            power = skew
            for _ in range(SERIES_FACTORS - 1):
                power = torch.bmm(power, power)
                inverse = torch.baddbmm(inverse, inverse, power)  # X (I + P)
            rotation = torch.baddbmm(inverse, skew, inverse)  # (I + S) X
        ctx.save_for_backward(rotation)
        return rotation

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (rotation,) = ctx.saved_tensors
        xt = rotation.mT + torch.eye(rotation.shape[-1], device=rotation.device, dtype=rotation.dtype)
        return 0.5 * (xt @ grad @ xt), None


def cayley(skew: torch.Tensor, mode: str = "exact", neumann_terms: int = 5, series_ok: bool = False) -> torch.Tensor:
    """Batched Cayley transform of skew-symmetric (..., b, b) matrices, computed in float32.

    mode: "exact" or "neumann" (k-term series for (I - S)^-1, k = neumann_terms).
    series_ok: the caller guarantees |S|_2 <= SERIES_MAX_NORM for every block, so the exact mode
    may use the matmul-only doubling product (see module doc) instead of a solve.
    Returns float32 (..., b, b) matrices, orthogonal (to float32 precision) in exact mode.
    """
    shape = skew.shape
    skew = skew.float().reshape(-1, shape[-1], shape[-1])  # (batch, b, b): plain bmm, no broadcasting
    if mode == "exact":
        # R = (I - S)^-1 (I + S): the doubling product or one batched solve, no explicit inverse.
        return _ExactCayley.apply(skew, series_ok).view(shape)
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
