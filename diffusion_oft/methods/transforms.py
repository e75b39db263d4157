"""Structured d x d maps, applied without ever forming a dense d x d matrix.

Every method builds one of these from its parameters (in float32).  The layer code needs:
  * ``right_mul(X, transpose)``: rows X (..., d) -> X @ T (or X @ T^T),
  * ``linear_after(X, W)``: (X @ T) @ W^T, which a transform may compute more cheaply than
    right_mul followed by the linear (low-rank transforms do: they never touch X twice),
  * ``inverse()`` for unmerging.
Block-diagonal products are reshapes + batched matmuls, butterfly permutations are reshapes of
the coordinate axis (no index tensors), Householder-type blocks are thin low-rank updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linalg import solve


class BlockTransform:
    """A d x d map with structure; subclasses implement right multiplication."""

    dim: int

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


def block_diag_right_mul(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x (..., n*b) @ BlockDiag(blocks (n, b, b)) (or its transpose), one batched matmul."""
    n, b, _ = blocks.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
    mats = blocks.transpose(-1, -2) if transpose else blocks
    return torch.bmm(xb, mats).transpose(0, 1).reshape(*lead, n * b)


class _RotatedWeightLinear(torch.autograd.Function):
    """(x @ BlockDiag(R)) @ W^T + bias for a frozen W, computed as x @ (W @ BlockDiag(R)^T)^T + bias.

    Forward: the rotation goes onto the weight (d_out * d_in * b multiply-adds) instead of the
    activations (tokens * d_in * b, plus two transposing copies of x), then one plain GEMM.
    Backward: never forms a weight gradient (W is frozen): gz = g @ W, gx = gz @ BlockDiag(R)^T,
    dR_k = x_k^T gz_k per block — the same products the activation-side path does.
    x (..., n*b), blocks (n, b, b), weight (d_out, n*b), bias (d_out,) or None.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, blocks: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, blocks, weight)
        return F.linear(x, block_diag_right_mul(weight, blocks, transpose=True), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, blocks, weight = ctx.saved_tensors
        n, b, _ = blocks.shape
        gz = grad.reshape(-1, grad.shape[-1]) @ weight  # (tokens, d_in): the gradient at x @ BlockDiag(R)
        gx = gblocks = gbias = None
        if ctx.needs_input_grad[3]:
            gbias = grad.reshape(-1, grad.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gx = block_diag_right_mul(gz, blocks, transpose=True).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            xb = x.reshape(-1, n, b).transpose(0, 1)  # (n, tokens, b)
            gzb = gz.reshape(-1, n, b).transpose(0, 1)
            gblocks = torch.bmm(xb.transpose(1, 2), gzb)  # (n, b, b)
        return gx, gblocks, None, gbias


def rotate_weight_first(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The rule for where a block-diagonal input rotation goes in training (see README, Performance):
    on the frozen weight when it has fewer rows than x has tokens (d_out < tokens: self-attention
    and to_q/to_out on image tokens), else on the activations (cross-attention K/V see only the
    77 text tokens).  Both avoid any weight gradient; only the forward product differs."""
    tokens = x.numel() // max(1, x.shape[-1])
    return (
        weight.shape[0] < tokens
        and not weight.requires_grad
        and x.dtype == weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


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
    """Block-diagonal H = BlockDiag(I + A_i M_i A_i^T) (ETHER, ETHER+; Householder-type).

    basis: (n, b, k) float32 (the unit vectors u, v of each block as columns),
    core: (n, k, k).  ETHER: k = 1, core = -2 (a reflection).  ETHER+: k = 2, core = diag(-1, +1).
    With A = BlockDiag(A_i) (d, n*k) thin, x @ H = x + (x A) M A^T: applying it costs like a
    rank-(n*k) LoRA, independent of the block size.
    """

    def __init__(self, basis: torch.Tensor, core: torch.Tensor):
        self.basis = basis
        self.core = core
        self.dim = basis.shape[0] * basis.shape[1]

    @property
    def device(self) -> torch.device:
        return self.basis.device

    def split(self, dims: list[int]) -> list[LowRankBlockTransform]:
        sizes = [d // self.basis.shape[1] for d in dims]
        pieces = zip(self.basis.split(sizes), self.core.split(sizes), strict=True)
        return [LowRankBlockTransform(basis, core) for basis, core in pieces]

    def tensors(self) -> list[torch.Tensor]:
        return [self.basis, self.core]

    @property
    def fusable(self) -> bool:
        """Few enough columns (n * k) for the thin-matrix form to beat per-block products."""
        return self.basis.shape[0] * self.basis.shape[2] <= 64

    def thin_basis(self, dtype: torch.dtype) -> torch.Tensor:
        """A = BlockDiag(A_1..A_n): (d, n*k), mostly zeros but thin (n*k columns)."""
        return _block_diagonal(self.basis.to(dtype))

    def block_core(self, dtype: torch.dtype, transpose: bool = False) -> torch.Tensor:
        """BlockDiag(M_1..M_n): (n*k, n*k)."""
        core = self.core.to(dtype)
        return _block_diagonal(core.transpose(-1, -2) if transpose else core)

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        n, b, k = self.basis.shape
        if n * k > 64:  # many blocks: per-block products beat a (d, n*k) matrix of zeros
            xb = x.reshape(*x.shape[:-1], n, b)
            basis = self.basis.to(x.dtype)
            core = self.core.to(x.dtype)
            coeff = torch.einsum("...nb,nbk->...nk", xb, basis)
            coeff = torch.einsum("...nk,nkl->...nl", coeff, core.transpose(-1, -2) if transpose else core)
            return (xb + torch.einsum("...nl,nbl->...nb", coeff, basis)).reshape(x.shape)
        # x + (x A) M A^T = x + (x A) (A M^T)^T: two passes over x (one thin matmul, one addmm).
        a = self.thin_basis(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        am = a @ self.block_core(x.dtype, transpose=not transpose)  # (d, n k): A M^T (or A M)
        return torch.addmm(x2, x2 @ a, am.t()).view(x.shape)

    def linear_after(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # (x H) W^T = x W^T + (x A) M (W A)^T: the frozen linear plus a LoRA-shaped correction.
        if not (self.fusable and low_rank_on_weight(x, weight)):
            return super().linear_after(x, weight, bias)
        return fused_low_rank_linear(x, weight, bias, self, None)

    def inverse(self) -> LowRankBlockTransform:
        # Woodbury: (I + A M A^T)^-1 = I - A (M^-1 + A^T A)^-1 A^T, a k x k solve per block.
        basis = self.basis.double()
        core = self.core.double()
        gram = basis.transpose(-1, -2) @ basis  # (n, k, k)
        eye = torch.eye(core.shape[-1], dtype=core.dtype, device=core.device).expand_as(core)
        inner = torch.linalg.solve(core, eye) + gram
        if bool((torch.linalg.det(inner).abs() < 1e-10).any()):
            raise RuntimeError(
                "this ETHER+ transform is singular (its u and v became orthogonal), so it cannot be "
                "inverted exactly; keep a copy of the base weights instead of unmerging"
            )
        return LowRankBlockTransform(self.basis, -torch.linalg.solve(inner, eye))  # float64 core


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """(n, p, q) blocks -> the (n*p, n*q) block-diagonal matrix, in one broadcast multiply."""
    n, p, q = blocks.shape
    eye = torch.eye(n, dtype=blocks.dtype, device=blocks.device)
    return (blocks[:, :, None, :] * eye[:, None, :, None]).reshape(n * p, n * q)


def low_rank_on_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where a low-rank (Householder-type) transform goes in training: fused with the frozen weight
    (P = W A: d_out * d_in * k, in the forward and again in the backward) or on the activations
    (x + (x A) M A^T: tokens * d_in * k, no extra pass over W).  The weight side wins when W has
    fewer rows than x has tokens, and also when x needs no gradient (text K/V inputs): the
    activation side would then add the full g @ W product (tokens * d_out * d_in) to the backward
    just to reach A, which the weight side gets from W^T dP (d_out * d_in * k)."""
    tokens = x.numel() // max(1, x.shape[-1])
    return (
        (weight.shape[0] < tokens or not x.requires_grad)
        and not weight.requires_grad
        and x.dtype == weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


def fused_low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t_in: LowRankBlockTransform | None,
    t_out: LowRankBlockTransform | None,
) -> torch.Tensor:
    """y = x (H_out W H_in^T)^T + bias for low-rank transforms on one or both sides, as a LoRA:
    y = x W^T + b + (x L) R^T with a thin L (d_in, r) and R (d_out, r) made from the weight.

    With H_in = I + A M A^T, H_out = I + B N B^T, P = W A, Q = W^T B and G = P^T B:
        y = x W^T + b + (x A) M P^T + (x Q) N^T B^T + (x A) M G N^T B^T,
    so L = [A, Q] and R = [P M^T + B (M G N^T)^T, B N].  The activations see two passes (x L and one
    addmm into y) forward, like a LoRA of rank r; everything else is weight-sized.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    dtype = x2.dtype
    left, right = [], []
    if t_in is not None:
        a = t_in.thin_basis(dtype)  # (d_in, r1)
        m = t_in.block_core(dtype)  # (r1, r1)
        p = weight @ a  # (d_out, r1)
        right_a = p @ m.t()
        left.append(a)
    if t_out is not None:
        b = t_out.thin_basis(dtype)  # (d_out, r2)
        n = t_out.block_core(dtype)  # (r2, r2)
        left.append(weight.t() @ b)  # Q: (d_in, r2)
        if t_in is not None:
            right_a = right_a + b @ (m @ (p.t() @ b) @ n.t()).t()
    if t_in is not None:
        right.append(right_a)
    if t_out is not None:
        right.append(b @ n)
    thin_left = torch.cat(left, dim=1) if len(left) > 1 else left[0]
    thin_right = torch.cat(right, dim=1) if len(right) > 1 else right[0]
    y = F.linear(x2, weight, bias)
    y = torch.addmm(y, x2 @ thin_left, thin_right.t())
    return y.view(*lead, y.shape[-1])
