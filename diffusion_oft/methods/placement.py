"""Placement rules: where each structured transform is applied in a training forward (see README,
"Where the transform is applied"), and the sizes those rules turn on.  Pure decisions on shapes and
flags; the transforms (``transforms``) and the autograd nodes (``nodes``) follow them.
"""

from __future__ import annotations

import torch

# Low-rank (Householder-type) transforms: up to this many thin columns (blocks n x vectors k) the thin
# (d, n*k) block-diagonal matrices beat per-block products (einsum over the blocks); above it, per block.
THIN_MAX_COLUMNS = 64
# The output side of a low-rank transform acts on y (not folded into the thin matrices) when the call
# has at most d_in / OUTPUT_SIDE_TOKEN_RATIO tokens.
OUTPUT_SIDE_TOKEN_RATIO = 3
# BOFT: m butterfly factors of block size b mix chunks of ``span`` = b * 2**(m-1) coordinates; up to
# max(2 * m * b, COLLAPSE_MIN_SPAN) the product's span-sized blocks (one batched matmul) beat m matmuls
# and 2m shuffles.
COLLAPSE_MIN_SPAN = 32


def rotate_weight_first(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The rule for where a block-diagonal input rotation goes in training (see README, Performance):
    on the frozen weight when it has fewer rows than x has tokens (d_out < tokens: self-attention
    and to_q/to_out on image tokens), else on the activations (cross-attention K/V see only the
    77 text tokens).  Both avoid any weight gradient; only the forward product differs."""
    return weight.shape[0] < _tokens(x) and _weight_side_possible(x, weight)


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _weight_side_possible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A transform may be folded into the weight in training: W is frozen (no weight gradient to
    route), and x and W share a dtype outside autocast (the folded product is then plain F.linear)."""
    return not weight.requires_grad and x.dtype == weight.dtype and not torch.is_autocast_enabled(x.device.type)


def low_rank_on_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where a low-rank (Householder-type) transform goes in training: fused with the frozen weight
    (W V: d_out * d_in * k, in the forward and again in the backward) or on the activations
    (x + (x U) V^T: tokens * d_in * k, no extra pass over W).  The weight side wins when W has
    fewer rows than x has tokens, and also when x needs no gradient (text K/V inputs): the
    activation side would then add the full g @ W product (tokens * d_out * d_in) to the backward
    just to reach V, which the weight side gets from W^T dP (d_out * d_in * k)."""
    return (weight.shape[0] < _tokens(x) or not x.requires_grad) and _weight_side_possible(x, weight)


def output_side_on_activations(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where ``fused_low_rank_linear`` puts an output-side transform: on y (about 6 T d_out k
    multiply-adds forward and backward, and y, T x d_out, kept for the backward) when that beats
    folding it into the thin matrices (2 d_out d_in k for W^T V' and its gradient, plus wider
    passes over x): with 3 T <= d_in, e.g. cross-attention K/V on 77 text tokens (d_in 768)."""
    return OUTPUT_SIDE_TOKEN_RATIO * _tokens(x) <= weight.shape[1]


def thin_fits(columns: int) -> bool:
    """A low-rank transform with this many thin columns (n * k) uses the thin-matrix form."""
    return columns <= THIN_MAX_COLUMNS


def collapse_butterfly(span: int, n_factors: int, block_size: int) -> bool:
    """BOFT: build one block-diagonal factor of ``span``-sized blocks instead of applying m factors."""
    return n_factors > 1 and span <= max(2 * n_factors * block_size, COLLAPSE_MIN_SPAN)
