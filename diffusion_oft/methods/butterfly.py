"""Butterfly permutations of BOFT, as index vectors (never permutation matrices).

Level i (0-based; level 0 is the identity) works inside chunks of ``block_size * 2**i``
consecutive coordinates: each chunk is cut into half-blocks of ``block_size // 2`` and the
half-blocks are reordered evens first, then odds.  This is the layout of the BOFT reference
implementation (and PEFT), so adapters convert between the two without re-indexing.
"""

from __future__ import annotations

import torch


def butterfly_constraints(dim: int, block_size: int, n_factors: int) -> str | None:
    """Why (dim, block_size, n_factors) is not a valid butterfly, or None if it is."""
    if block_size < 1 or dim % block_size != 0:
        return f"block size {block_size} does not divide the dimension {dim}"
    if n_factors > 1:
        if block_size % 2 != 0:
            return f"block size {block_size} must be even when n_butterfly_factors > 1"
        span = block_size * 2 ** (n_factors - 1)
        if dim % span != 0:
            return (
                f"n_butterfly_factors={n_factors} needs the dimension {dim} to be divisible by "
                f"block_size * 2**(m-1) = {span}"
            )
    return None


def butterfly_permutation(dim: int, block_size: int, level: int) -> torch.Tensor | None:
    """Index vector ``perm`` of the level-``level`` butterfly permutation P (P[k, perm[k]] = 1).

    Returns None for the identity (level 0).
    """
    if level == 0:
        return None
    half = block_size // 2
    chunk = block_size * 2**level
    n_halves = chunk // half  # 2**(level + 1)
    order = list(range(0, n_halves, 2)) + list(range(1, n_halves, 2))
    within = torch.cat([torch.arange(pos * half, (pos + 1) * half) for pos in order])  # (chunk,)
    starts = torch.arange(0, dim, chunk).unsqueeze(1)  # (dim/chunk, 1)
    return (starts + within.unsqueeze(0)).reshape(-1)
