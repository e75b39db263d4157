"""Skew-symmetric generators and the Cayley transform, batched over blocks.

Sign convention (used everywhere in diffusion-oft):

    R = Cayley(S) = (I + S)(I - S)^-1 = (I - S)^-1 (I + S)        S = -S^T

so that R ~ I + 2S for small S.  The exact mode solves (I - S)^T X^T = (I + S)^T with
``torch.linalg.solve`` in float32; the Neumann mode (OFTv2) replaces (I - S)^-1 by the
truncated series I + S + S^2 + ... + S^k.  Both modes agree up to the series error,
which is O(|S|^(k+1)).
"""

from __future__ import annotations

import torch

__all__ = ["num_skew_params", "skew_from_triu", "triu_from_skew", "cayley"]


def num_skew_params(block_size: int) -> int:
    """Numbers stored per skew-symmetric block: its strict upper triangle, b(b-1)/2."""
    return block_size * (block_size - 1) // 2


def _triu_indices(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=device)
    return rows, cols


def skew_from_triu(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., b(b-1)/2) strict upper triangles -> (..., b, b) skew-symmetric matrices."""
    rows, cols = _triu_indices(block_size, vec.device)
    upper = vec.new_zeros(*vec.shape[:-1], block_size, block_size)
    upper[..., rows, cols] = vec
    return upper - upper.transpose(-1, -2)


def triu_from_skew(skew: torch.Tensor) -> torch.Tensor:
    """(..., b, b) matrices -> strict upper triangle of their skew part 1/2 (A - A^T)."""
    block_size = skew.shape[-1]
    rows, cols = _triu_indices(block_size, skew.device)
    skew = 0.5 * (skew - skew.transpose(-1, -2))
    return skew[..., rows, cols]


def cayley(skew: torch.Tensor, mode: str = "exact", neumann_terms: int = 5) -> torch.Tensor:
    """Batched Cayley transform of skew-symmetric (..., b, b) matrices, computed in float32.

    mode: "exact" (linear solve) or "neumann" (k-term series for (I - S)^-1, k = neumann_terms).
    Returns float32 (..., b, b) matrices, orthogonal in exact mode.
    """
    skew = skew.float()
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
    if mode == "exact":
        # R = (I - S)^-1 (I + S)  <=>  (I - S) R = (I + S): one batched solve, no explicit inverse.
        return torch.linalg.solve(eye - skew, eye + skew)
    if mode == "neumann":
        # (I - S)^-1 ~ I + S + ... + S^k, evaluated Horner-style: I + S(I + S(I + ...)).
        series = eye + skew
        for _ in range(neumann_terms - 1):
            series = eye + skew @ series
        return series + skew @ series
    raise ValueError(f"unknown Cayley mode {mode!r}; use 'exact' or 'neumann'")
