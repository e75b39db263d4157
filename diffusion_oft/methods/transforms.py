"""Structured d x d maps, applied without ever forming a dense d x d matrix.

Every method builds one of these from its parameters (in float32).  The layer code only needs
``right_mul``: for rows X of shape (..., d) it returns X @ T (or X @ T^T), plus ``inverse`` for
unmerging.  Block-diagonal products are reshapes + batched matmuls, permutations are index
gathers, Householder-type blocks are low-rank updates.
"""

from __future__ import annotations

import torch


class BlockTransform:
    """A d x d map with structure; subclasses implement right multiplication."""

    dim: int

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def inverse(self) -> BlockTransform:  # pragma: no cover
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """Dense matrix, for tests and small debugging only (never used on the hot path)."""
        eye = torch.eye(self.dim, dtype=torch.float32, device=self.device)
        return self.right_mul(eye)

    @property
    def device(self) -> torch.device:  # pragma: no cover
        raise NotImplementedError


def _block_right_mul(x: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x: (..., n*b), blocks: (n, b, b) -> x @ BlockDiag(blocks) (or its transpose)."""
    n, b, _ = blocks.shape
    xb = x.reshape(*x.shape[:-1], n, b)
    if transpose:
        out = torch.einsum("...nj,nij->...ni", xb, blocks)  # x @ B^T: out_i = sum_j x_j B_ij
    else:
        out = torch.einsum("...ni,nij->...nj", xb, blocks)
    return out.reshape(x.shape)


class ButterflyTransform(BlockTransform):
    """A product of permuted block-diagonal factors, T = F_1 F_2 ... F_m (BOFT; m = 1 is OFT).

    Factors are stored in multiplication order: X @ T = X @ F_1 @ ... @ F_m.  Factor j is
    F_j = P_j BlockDiag(blocks[j]) P_j^T with blocks (m, n, b, b) float32 and perms[j] a
    LongTensor (d,) or None (identity), where P_j[k, perms[j][k]] = 1; hence
    X @ P_j^T = X[..., perm] and X @ P_j = X[..., argsort(perm)].
    """

    def __init__(self, blocks: torch.Tensor, perms: list[torch.Tensor | None]):
        self.blocks = blocks
        self.perms = perms
        self.inv_perms = [None if p is None else torch.argsort(p) for p in perms]
        self.dim = blocks.shape[1] * blocks.shape[2]

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        blocks = self.blocks.to(x.dtype)
        m = blocks.shape[0]
        # X @ T = X @ F_1 ... F_m   ;   X @ T^T = X @ F_m^T ... F_1^T
        for j in reversed(range(m)) if transpose else range(m):
            perm, inv = self.perms[j], self.inv_perms[j]
            if perm is not None:
                x = x[..., inv]  # X @ P_j
            x = _block_right_mul(x, blocks[j], transpose)
            if perm is not None:
                x = x[..., perm]  # X @ P_j^T
        return x

    def inverse(self) -> ButterflyTransform:
        # T^-1 = F_m^-1 ... F_1^-1, each factor inverted block by block (small b x b solves).
        eye = torch.eye(self.blocks.shape[-1], dtype=torch.float64, device=self.device)
        # Kept in float64: merge/unmerge run in float64, so unmerging does not drift.
        inv_blocks = torch.linalg.solve(self.blocks.double(), eye.expand_as(self.blocks))
        return ButterflyTransform(inv_blocks.flip(0), self.perms[::-1])


class LowRankBlockTransform(BlockTransform):
    """Block-diagonal H = BlockDiag(I + A_i M_i A_i^T) (ETHER, ETHER+; Householder-type).

    basis: (n, b, k) float32 (the unit vectors u, v of each block as columns),
    core: (n, k, k) float32.  ETHER: k = 1, core = -2 (a reflection).  ETHER+: k = 2,
    core = diag(-1, +1).  Applying costs O(tokens * d * k), independent of the block size.
    """

    def __init__(self, basis: torch.Tensor, core: torch.Tensor):
        self.basis = basis
        self.core = core
        self.dim = basis.shape[0] * basis.shape[1]

    @property
    def device(self) -> torch.device:
        return self.basis.device

    def right_mul(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        n, b, _ = self.basis.shape
        basis = self.basis.to(x.dtype)
        core = self.core.to(x.dtype)
        if transpose:
            core = core.transpose(-1, -2)
        xb = x.reshape(*x.shape[:-1], n, b)
        coeff = torch.einsum("...nb,nbk->...nk", xb, basis)  # X A
        coeff = torch.einsum("...nk,nkl->...nl", coeff, core)  # X A M
        # X + X A M A^T, summed term by term (k <= 2): with v = -u (ETHER+ at init) the two
        # terms cancel exactly, so the identity is reproduced bit for bit.
        delta = coeff[..., 0:1] * basis[..., 0]
        for col in range(1, basis.shape[-1]):
            delta = delta + coeff[..., col : col + 1] * basis[..., col]
        return (xb + delta).reshape(x.shape)

    def inverse(self) -> LowRankBlockTransform:
        # Woodbury: (I + A M A^T)^-1 = I - A (M^-1 + A^T A)^-1 A^T, a k x k solve per block.
        basis = self.basis.double()
        core = self.core.double()
        gram = basis.transpose(-1, -2) @ basis  # (n, k, k)
        eye = torch.eye(core.shape[-1], dtype=core.dtype, device=core.device).expand_as(core)
        m_inv = torch.linalg.solve(core, eye)
        inner = m_inv + gram
        det = torch.linalg.det(inner)
        if bool((det.abs() < 1e-10).any()):
            raise RuntimeError(
                "this ETHER+ transform is singular (its u and v became orthogonal), so it cannot be "
                "inverted exactly; keep a copy of the base weights instead of unmerging"
            )
        new_core = -torch.linalg.solve(inner, eye)  # float64, see ButterflyTransform.inverse
        return LowRankBlockTransform(self.basis, new_core)
