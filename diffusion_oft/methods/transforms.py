"""Structured d x d maps, applied without ever forming a dense d x d matrix.

Every method builds one of these from its parameters (in float32).  The layer code needs:
  * ``right_mul(X, transpose)``: rows X (..., d) -> X @ T (or X @ T^T),
  * ``linear_after(X, W)``: (X @ T) @ W^T, which a transform may compute more cheaply than
    right_mul followed by the linear (low-rank transforms do: they never touch X twice),
  * ``fused_linear(...)``: one adapter's transforms on both sides folded around the frozen linear,
    or None when the transform kind cannot (the layer asks the transform, not its type),
  * ``inverse()`` for unmerging.
Block-diagonal products are reshapes + batched matmuls, butterfly permutations are reshapes of
the coordinate axis (no index tensors), Householder-type blocks are thin low-rank updates.  Where
each goes in training is ``placement``'s rules; the custom autograd nodes are in ``nodes``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linalg import solve
from .nodes import _RotatedWeightLinear, block_diag_right_mul, fused_low_rank_linear, thin_update_linear
from .placement import (
    collapse_butterfly,
    low_rank_on_weight,
    output_side_on_activations,
    rotate_weight_first,
    thin_fits,
)

__all__ = [
    "BlockTransform",
    "ButterflyTransform",
    "LowRankBlockTransform",
    "block_diag_right_mul",
    "butterfly_shuffle",
    "collapse_butterfly",
    "fused_low_rank_linear",
    "low_rank_on_weight",
    "output_side_on_activations",
    "rotate_weight_first",
    "thin_update_linear",
]


class BlockTransform:
    """A d x d map with structure; subclasses implement right multiplication."""

    dim: int
    low_rank: bool = False  # I + U V^T with thin U, V (``thin``): exact LoRA exports, thin fused products
    fusable: bool = False  # ``fused_linear`` can fold this transform around a frozen linear

    def fused_linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        t_in: BlockTransform | None,
        t_out: BlockTransform | None,
    ) -> torch.Tensor | None:
        """x (t_out W t_in)^T + bias for one adapter's transforms on both sides in one fused path, or
        None when this kind of transform has none (the layer then applies the sides one by one)."""
        return None

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def linear_after(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(x @ T) @ weight^T + bias; weight: (out, d)."""
        return F.linear(self.right_mul(x), weight, bias)

    def inverse(self) -> BlockTransform:  # pragma: no cover
        raise NotImplementedError

    def split(self, dims: list[int]) -> list[BlockTransform]:  # pragma: no cover
        """The transforms of consecutive coordinate ranges of sizes ``dims`` (views, differentiable):
        a transform built from several layers' concatenated parameters is their direct sum."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:  # pragma: no cover
        """The tensors this transform is made of."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:  # pragma: no cover
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """Dense matrix, for tests and debugging only (never used on the hot path)."""
        return self.right_mul(torch.eye(self.dim, dtype=torch.float32, device=self.device))


def butterfly_shuffle(x: torch.Tensor, level: int, block_size: int, inverse: bool = False) -> torch.Tensor:
    """x @ P_level^T (``inverse``: x @ P_level) for BOFT's level-``level`` butterfly permutation.

    Within chunks of block_size * 2**level coordinates, half-blocks (block_size // 2) are put in
    the order evens-then-odds: viewing a chunk as a (2**level, 2) grid of half-blocks, that is a
    transpose to (2, 2**level).  See ``butterfly.butterfly_permutation`` for the index form.
    """
    if level == 0:
        return x
    groups, half = 2**level, block_size // 2
    lead, dim = x.shape[:-1], x.shape[-1]
    chunks = dim // (groups * half * 2)
    grid = (chunks, 2, groups, half) if inverse else (chunks, groups, 2, half)
    return x.reshape(*lead, *grid).transpose(-3, -2).reshape(*lead, dim)


class ButterflyTransform(BlockTransform):
    """A product of permuted block-diagonal factors, T = F_1 F_2 ... F_m (BOFT; m = 1 is OFT).

    Factors are stored in multiplication order: X @ T = X @ F_1 @ ... @ F_m, with
    F_j = P_j BlockDiag(blocks[j]) P_j^T, blocks (m, n, b, b) and P_j the butterfly permutation of
    level ``levels[j]`` (0 = identity).
    """

    def __init__(self, blocks: torch.Tensor, levels: list[int]):
        self.blocks = blocks
        self.levels = list(levels)
        self.block_size = blocks.shape[-1]
        self.dim = blocks.shape[1] * blocks.shape[2]

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def span(self) -> int:
        """Coordinates mixed together: T is block-diagonal with blocks of this size."""
        return self.block_size * 2 ** max(self.levels)

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        blocks = self.blocks.to(x.dtype)
        b = self.block_size
        # X @ T = X @ F_1 ... F_m   ;   X @ T^T = X @ F_m^T ... F_1^T
        for j in reversed(range(len(self.levels))) if transpose else range(len(self.levels)):
            x = butterfly_shuffle(x, self.levels[j], b, inverse=True)  # X @ P_j
            x = block_diag_right_mul(x, blocks[j], transpose)
            x = butterfly_shuffle(x, self.levels[j], b)  # X @ P_j^T
        return x

    def collapsed(self) -> ButterflyTransform:
        """The same map as ONE block-diagonal factor with blocks of size ``span`` (differentiable).

        T only mixes coordinates within chunks of ``span``; its diagonal blocks cost span * d * m * b
        to form, and applying them is one batched matmul instead of m matmuls and 2m shuffles.
        """
        span, d = self.span, self.dim
        if len(self.levels) == 1:
            return self
        chunks = d // span
        # Row r of `probe` has a 1 at coordinate r of every chunk; row r of probe @ T is then, chunk by
        # chunk, row r of each diagonal block of T.
        eye = torch.eye(span, dtype=self.blocks.dtype, device=self.device)
        probe = eye.repeat(1, chunks)  # (span, d)
        rows = self.right_mul(probe)  # (span, d)
        blocks = rows.reshape(span, chunks, span).transpose(0, 1)  # (chunks, span, span)
        return ButterflyTransform(blocks.unsqueeze(0), [0])

    def split(self, dims: list[int]) -> list[ButterflyTransform]:
        # Butterfly shuffles stay inside chunks of ``span`` coordinates, which divide every layer's dim.
        pieces = self.blocks.split([d // self.block_size for d in dims], dim=1)
        return [ButterflyTransform(p, self.levels) for p in pieces]

    def tensors(self) -> list[torch.Tensor]:
        return [self.blocks]

    def linear_after(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.levels == [0] and rotate_weight_first(x, weight):
            return _RotatedWeightLinear.apply(x, self.blocks[0].to(x.dtype), weight, bias)
        return F.linear(self.right_mul(x), weight, bias)

    def inverse(self) -> ButterflyTransform:
        # T^-1 = F_m^-1 ... F_1^-1, each factor inverted block by block (small b x b solves), kept in
        # float64: merge/unmerge run in float64, so unmerging does not drift.
        eye = torch.eye(self.blocks.shape[-1], dtype=torch.float64, device=self.device)
        inv_blocks = solve(self.blocks.double(), eye.expand_as(self.blocks))
        return ButterflyTransform(inv_blocks.flip(0), self.levels[::-1])


class LowRankBlockTransform(BlockTransform):
    """Block-diagonal H = BlockDiag(I + U_i V_i^T) (ETHER, ETHER+; Householder-type).

    left U, right V: (n, b, k) float32.  ETHER: k = 1, U = u^, V = -2 u^ (a reflection).  ETHER+:
    k = 2 (see ``ether``).  With thin block-diagonal U, V (d, n*k), x @ H = x + (x U) V^T: applying
    it costs like a rank-(n*k) LoRA, independent of the block size.
    """

    def __init__(self, left: torch.Tensor, right: torch.Tensor, thin: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.left = left
        self.right = right
        self.dim = left.shape[0] * left.shape[1]
        self._thin = thin  # (U, V) as thin (d, n*k) float32 matrices, when built ahead (``split``)

    @property
    def device(self) -> torch.device:
        return self.left.device

    def split(self, dims: list[int]) -> list[LowRankBlockTransform]:
        n, b, k = self.left.shape
        sizes = [d // b for d in dims]
        pieces = zip(self.left.split(sizes), self.right.split(sizes), strict=True)
        if len(set(sizes)) > 1 or not thin_fits(sizes[0] * k):
            return [LowRankBlockTransform(u, v) for u, v in pieces]
        # Equal block counts (e.g. num_blocks=4 everywhere): every piece's thin U and V at once.
        both = torch.stack([self.left, self.right]).view(2 * len(sizes), sizes[0], b, k)
        thin = _block_diagonal(both).view(2, len(sizes), sizes[0] * b, sizes[0] * k)
        return [LowRankBlockTransform(u, v, (tu, tv)) for (u, v), tu, tv in zip(pieces, thin[0], thin[1], strict=True)]

    low_rank = True

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right]

    def fused_linear(self, x, weight, bias, t_in, t_out):
        # ETHER / ETHER+ / HRA: both sides folded around the frozen linear as thin matmuls, where the rule says.
        sides = [t for t in (t_in, t_out) if t is not None]
        if all(t.fusable for t in sides) and low_rank_on_weight(x, weight):
            return fused_low_rank_linear(x, weight, bias, t_in, t_out)
        return None

    @property
    def fusable(self) -> bool:
        """Few enough columns (n * k) for the thin-matrix form to beat per-block products."""
        return thin_fits(self.left.shape[0] * self.left.shape[2])

    def thin(self, dtype: torch.dtype, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """U = BlockDiag(U_1..U_n) and V likewise: (d, n*k) each, mostly zeros but thin ((V, U) for
        H^T = I + V U^T when ``transpose``)."""
        # (Not cached when built here: a checkpointed segment must redo the same ops when recomputed.)
        thin = self._thin or (_block_diagonal(self.left), _block_diagonal(self.right))
        u, v = (t.to(dtype) for t in thin)
        return (v, u) if transpose else (u, v)

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        n, b, k = self.left.shape
        if not thin_fits(n * k):  # many blocks: per-block products beat a (d, n*k) matrix of zeros
            u, v = (self.right, self.left) if transpose else (self.left, self.right)  # H^T = I + V U^T
            xb = x.reshape(*x.shape[:-1], n, b)
            coeff = torch.einsum("...nb,nbk->...nk", xb, u.to(x.dtype))
            return (xb + torch.einsum("...nk,nbk->...nb", coeff, v.to(x.dtype))).reshape(x.shape)
        # x + (x U) V^T: two passes over x (one thin matmul, one in-place addmm).
        u, v = self.thin(x.dtype, transpose)
        return thin_update_linear(x, None, None, u, v)

    def linear_after(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # (x H) W^T = x W^T + (x U) (W V)^T: the frozen linear plus a LoRA-shaped correction.
        if not (self.fusable and low_rank_on_weight(x, weight)):
            return super().linear_after(x, weight, bias)
        return fused_low_rank_linear(x, weight, bias, self, None)

    def inverse(self) -> LowRankBlockTransform:
        # Woodbury: (I + U V^T)^-1 = I - U (I + V^T U)^-1 V^T, a k x k solve per block (float64).
        left, right = self.left.double(), self.right.double()
        inner = torch.eye(left.shape[-1], dtype=left.dtype, device=left.device) + right.transpose(-1, -2) @ left
        if bool((torch.linalg.det(inner).abs() < 1e-10).any()):
            raise RuntimeError(
                "this ETHER+ transform is singular (its u and v became orthogonal), so it cannot be "
                "inverted exactly; keep a copy of the base weights instead of unmerging"
            )
        # -U (I + V^T U)^-1 = -(inner^-T U^T)^T: a solve, no explicit inverse.
        new_left = -torch.linalg.solve(inner.transpose(-1, -2), left.transpose(-1, -2)).transpose(-1, -2)
        return LowRankBlockTransform(new_left, right)  # float64


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(..., n, p, q) blocks -> the (..., n*p, n*q) block-diagonal matrices: zeros with the blocks
    copied onto their diagonal view (the backward reads that view back; no broadcast products)."""
    *lead, n, p, q = blocks.shape
    out = blocks.new_zeros(*lead, n, p, n, q)
    out.diagonal(dim1=-4, dim2=-2).copy_(blocks.movedim(-3, -1))  # diagonal view: (..., p, q, n)
    return out.view(*lead, n * p, n * q)
