"""Batched linear solves that work around an MKL hang in PyTorch's CPU builds.

On CPU with more than one thread, a *batched* LU factorization (``torch.linalg.solve``, ``inv``,
``det``, ``lu_factor``) of matrices larger than about 150 x 150 runs MKL's threaded ``getrf``
inside PyTorch's own parallel loop over the batch; MKL then prints "Parameter 6 was incorrect on
entry to SLASWP" and either fails or spins forever (pytorch/pytorch#142815, still present in
torch 2.13). A single matrix per call is not affected, so large blocks are solved one at a time:
the loop costs one call per block (a few per layer), nothing next to the O(b^3) solve itself.
"""

from __future__ import annotations

import math

import torch

__all__ = ["solve"]

# Blocks up to this size are solved in one batched call (measured safe up to 144 on torch 2.13);
# larger ones one matrix per call on CPU. Kept well below the failing size.
BATCHED_SOLVE_MAX_SIZE = 96


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve(a, b)`` for (..., n, n) ``a`` and (..., n, k) ``b`` of the same batch shape."""
    n = a.shape[-1]
    batch = a.shape[:-2]
    if a.device.type != "cpu" or n <= BATCHED_SOLVE_MAX_SIZE or math.prod(batch) <= 1:
        return torch.linalg.solve(a, b)
    b = b.expand(*batch, *b.shape[-2:])
    a_flat, b_flat = a.reshape(-1, n, n), b.reshape(-1, n, b.shape[-1])
    return torch.stack([torch.linalg.solve(ai, bi) for ai, bi in zip(a_flat, b_flat, strict=True)]).view(*batch, n, -1)
