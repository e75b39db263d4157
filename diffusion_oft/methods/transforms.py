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


class _ThinUpdateLinear(torch.autograd.Function):
    """y = x W^T + bias + (x L) R^T for a frozen W (or y = x + bias + (x L) R^T when W is None):
    a frozen linear or the identity plus a thin update of rank r, as one autograd node.

    The products are those autograd would run, but the update is added to y in place (no copy of
    y) and the thin gradients are formed as (r, d) products and transposed: (gP^T x)^T instead of
    x^T gP, the faster orientation for thin CPU GEMMs (about 1.5-2x at T = 256-4096).
    x (T, d_in), weight (d_out, d_in) or None, bias (d_out,) or None, left L (d_in, r), right R (d_out, r).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left, right):
        if weight is None:
            y = x.clone() if bias is None else x + bias
        else:
            y = F.linear(x, weight, bias)
        p = x @ left  # (T, r)
        y.addmm_(p, right.t())
        ctx.save_for_backward(x, weight, left, right, p)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, left, right, p = ctx.saved_tensors
        need_x, _, need_bias, need_left, need_right = ctx.needs_input_grad
        gx = gbias = gleft = gright = None
        gp = grad @ right if need_x or need_left else None  # (T, r): the gradient at x L
        if need_x:
            gx = (grad @ weight if weight is not None else grad.clone()).addmm_(gp, left.t())
        if need_bias:
            gbias = grad.sum(0)
        if need_left:
            gleft = (gp.t() @ x).t()  # (d_in, r)
        if need_right:
            gright = (p.t() @ grad).t()  # (d_out, r)
        return gx, None, gbias, gleft, gright


class _FrozenThinProduct(torch.autograd.Function):
    """W @ V for a frozen W (a, b) and a thin V (b, r), returned as (a, r).  Both this product and its
    gradient W^T G are formed as (r, .) products and transposed, the faster orientation for thin
    CPU GEMMs (about 2x for the (1280, 768) weights of SD's text K/V)."""

    @staticmethod
    def forward(ctx, weight, thin):
        ctx.save_for_backward(weight)
        return (thin.t() @ weight.t()).t()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return None, (grad.t() @ weight).t()


def thin_update_linear(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """x (..., d_in) -> x W^T + bias + (x L) R^T (W frozen; None: the identity), one autograd node.
    Under autocast (mixed dtypes) it falls back to plain ops."""
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_autocast_enabled(x.device.type) or (weight is not None and weight.requires_grad):
        y = x2 if weight is None else F.linear(x2, weight)
        y = torch.addmm(y if bias is None else y + bias, x2 @ left, right.t())
    else:
        y = _ThinUpdateLinear.apply(x2, weight, bias, left, right)
    return y.view(*x.shape[:-1], y.shape[-1])


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
        if len(set(sizes)) > 1 or sizes[0] * k > 64:
            return [LowRankBlockTransform(u, v) for u, v in pieces]
        # Equal block counts (e.g. num_blocks=4 everywhere): every piece's thin U and V at once.
        both = torch.stack([self.left, self.right]).view(2 * len(sizes), sizes[0], b, k)
        thin = _block_diagonal(both).view(2, len(sizes), sizes[0] * b, sizes[0] * k)
        return [LowRankBlockTransform(u, v, (tu, tv)) for (u, v), tu, tv in zip(pieces, thin[0], thin[1], strict=True)]

    def tensors(self) -> list[torch.Tensor]:
        return [self.left, self.right]

    @property
    def fusable(self) -> bool:
        """Few enough columns (n * k) for the thin-matrix form to beat per-block products."""
        return self.left.shape[0] * self.left.shape[2] <= 64

    def thin(self, dtype: torch.dtype, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """U = BlockDiag(U_1..U_n) and V likewise: (d, n*k) each, mostly zeros but thin ((V, U) for
        H^T = I + V U^T when ``transpose``)."""
        # (Not cached when built here: a checkpointed segment must redo the same ops when recomputed.)
        thin = self._thin or (_block_diagonal(self.left), _block_diagonal(self.right))
        u, v = (t.to(dtype) for t in thin)
        return (v, u) if transpose else (u, v)

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        n, b, k = self.left.shape
        if n * k > 64:  # many blocks: per-block products beat a (d, n*k) matrix of zeros
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
    return 3 * _tokens(x) <= weight.shape[1]


def fused_low_rank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t_in: LowRankBlockTransform | None,
    t_out: LowRankBlockTransform | None,
) -> torch.Tensor:
    """y = x (H_out W H_in)^T + bias for low-rank transforms on one or both sides, as a LoRA:
    y = x W^T + b + (x L) R^T with thin L (d_in, r) and R (d_out, r) made from the weight.

    With H_in = I + U V^T and H_out^T = I + V' U'^T (y -> y H_out^T on the output):
        y = x W^T + b + (x U)(W V)^T + (x W^T V') U'^T + (x U)(V^T W^T V') U'^T,
    so L = [U, W^T V'] and R = [W V + U' G^T, U'] with G = V^T W^T V'.  The activations see two
    passes (x L, then one addmm into y) forward, as with a LoRA of rank r; the rest is weight-sized.

    With few tokens (``output_side_on_activations``: text K/V) the output side is applied to y
    instead, y -> y + (y V') U'^T: token-sized products in place of W^T V' and its gradient W dP,
    two weight-sized passes.
    """
    if t_out is not None and output_side_on_activations(x, weight):
        y = F.linear(x, weight) if t_in is None else fused_low_rank_linear(x, weight, None, t_in, None)
        v_out, u_out = t_out.thin(x.dtype, transpose=True)  # H_out^T = I + V' U'^T
        return thin_update_linear(y, None, bias, v_out, u_out)  # y H_out^T + bias, the bias in the same pass
    dtype = x.dtype
    left, right = [], []
    if t_in is not None:
        u, v = t_in.thin(dtype)  # (d_in, r1) each
        left.append(u)
        right_u = _FrozenThinProduct.apply(weight, v)  # W V: (d_out, r1)
    if t_out is not None:
        u_out, v_out = t_out.thin(dtype)  # (d_out, r2) each
        wt_v = _FrozenThinProduct.apply(weight.t(), v_out)  # W^T V': (d_in, r2)
        left.append(wt_v)
        if t_in is not None:
            right_u = right_u + u_out @ (v.t() @ wt_v).t()  # + U' G^T
    if t_in is not None:
        right.append(right_u)
    if t_out is not None:
        right.append(u_out)
    thin_left = torch.cat(left, dim=1) if len(left) > 1 else left[0]
    thin_right = torch.cat(right, dim=1) if len(right) > 1 else right[0]
    return thin_update_linear(x, weight, bias, thin_left, thin_right)
