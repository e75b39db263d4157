"""OFT and BOFT: products of butterfly-permuted block-diagonal Cayley rotations.

BOFT (Liu et al. 2024): R = B_m ... B_1, B_i = P_i BlockDiag(Cayley(S_i1), ..., Cayley(S_in)) P_i^T,
with P_1 = I.  OFT (Qiu et al. 2023) is the case m = 1.  Each S is skew-symmetric and stored as
its strict upper triangle: m * n * b(b-1)/2 numbers per layer, zero at init (R = I).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import AdapterConfig
from .base import OrthoMethod, block_structure, register_method
from .cayley import cayley, num_skew_params, skew_from_triu
from .transforms import BlockTransform, ButterflyTransform

# The Neumann series for (I - S)^-1 converges for |S|_2 < 1 (S is normal: |S|_2 is its spectral radius).
# The check uses the cheap |S|_F >= |S|_2 first and computes |S|_2 only for the blocks where that fails.
NEUMANN_LIMIT = 1.0
logger = logging.getLogger("diffusion_oft")
_neumann_warned = False


def _warn_neumann_fallback(bound: float) -> None:
    global _neumann_warned
    if not _neumann_warned:
        _neumann_warned = True
        logger.warning(
            "cayley_mode='neumann': a skew block has |S|_2 = %.3g >= %g, outside the series' region of "
            "convergence; those layers use the exact Cayley transform until |S| is back inside "
            "(warned once)", bound, NEUMANN_LIMIT,
        )


@register_method
class BOFT(OrthoMethod):
    """Butterfly orthogonal finetuning; parameter ``skew``: (m, n, b(b-1)/2)."""

    name = "boft"

    @classmethod
    def n_factors(cls, config: AdapterConfig) -> int:
        return config.n_butterfly_factors

    @classmethod
    def structure(cls, dim: int, config: AdapterConfig) -> tuple[int, int]:
        m = cls.n_factors(config)
        return block_structure(dim, config, multiple=2 ** (m - 1), even=m > 1)

    @classmethod
    def skew_shape(cls, m: int, n: int, b: int) -> tuple[int, ...]:
        return (m, n, num_skew_params(b))

    @classmethod
    def own_parameter_shapes(cls, in_features: int, out_features: int, config: AdapterConfig) -> dict:
        dim = cls.side_dim(config.side, in_features, out_features)
        n, b = cls.structure(dim, config)
        return {"skew": cls.skew_shape(cls.n_factors(config), n, b)}

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__(in_features, out_features, config)
        self.dim = self.side_dim(config.side, in_features, out_features)
        self.num_blocks, self.block_size = self.structure(self.dim, config)
        m = self.n_factors(config)
        self.skew = nn.Parameter(torch.zeros(self.skew_shape(m, self.num_blocks, self.block_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.init == "random":
            nn.init.normal_(self.skew, std=0.1)
        else:  # "default" and "identity": S = 0, R = I
            nn.init.zeros_(self.skew)
        if self.magnitude is not None:
            nn.init.ones_(self.magnitude)

    def skew_matrices(self, scale: float = 1.0, skew: torch.Tensor | None = None) -> torch.Tensor:
        """(m, n, b, b) float32 skew-symmetric generators, one per block and factor (of ``skew``, the
        parameter or several layers' parameters concatenated along the block axis; default: own)."""
        m = self.n_factors(self.config)
        vec = (self.skew if skew is None else skew).float().reshape(m, -1, num_skew_params(self.block_size))
        return skew_from_triu(vec * scale if scale != 1.0 else vec, self.block_size)

    def block_parameters(self) -> dict[str, torch.Tensor]:
        return {"skew": self.skew}

    def build_transforms(
        self, params: dict[str, torch.Tensor], key: tuple, scale: float = 1.0, dropout: bool = False
    ) -> dict[str, BlockTransform]:
        cfg = self.config
        skew = self.skew_matrices(scale, params["skew"])
        bound = self._skew_bound(skew, scale, key)
        neumann_ok = bound is not None and bound < NEUMANN_LIMIT
        mode = "exact" if cfg.cayley_mode == "neumann" and not neumann_ok else cfg.cayley_mode
        blocks = cayley(skew, mode, cfg.neumann_terms, bound=bound)  # (m, n, b, b)
        keep = self.block_keep_mask(blocks.shape[:2], blocks.device, dropout)
        if keep is not None:
            eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
            keep = keep[..., None, None]
            blocks = keep * blocks + (1 - keep) * eye
        m = blocks.shape[0]
        # R = B_m ... B_1 (B_i of butterfly level i - 1): in multiplication order the highest level first.
        rotation = ButterflyTransform(blocks.flip(0) if m > 1 else blocks, list(reversed(range(m))))
        # m factors only mix coordinates within chunks of b * 2**(m-1): when such chunks are small, one
        # block-diagonal matmul with the product's blocks is cheaper than m matmuls + 2m shuffles.
        if m > 1 and rotation.span <= max(2 * m * self.block_size, 32):
            rotation = rotation.collapsed()
        return {cfg.side: rotation}

    def _skew_bound(self, skew: torch.Tensor, scale: float, key: tuple) -> float | None:
        """An upper bound on every block's |S|_2 (host float), or None (unknown: exact mode solves).

        The cheap |S|_F >= |S|_2 is used; in Neumann mode, where 1 decides between the series and the
        exact transform, |S|_2 itself is computed for the blocks whose |S|_F fails.  Computed on the
        host once per change of the parameters (``key``: their in-place version counters, bumped by
        every optimizer step or load) and scale, so the normal path has one sync per step; under
        torch.compile the exact mode skips it (solve) and the Neumann mode reuses the last answer (no
        graph break), which ``constrain_`` (run eagerly by ``apply_constraints``) refreshes.  Outside
        the series' region the Neumann mode falls back to the exact transform, warned once.
        """
        neumann = self.config.cayley_mode == "neumann"
        cached = getattr(self, "_neumann_check", None)
        if torch.compiler.is_compiling():
            if not neumann:
                return None
            return 0.0 if cached is None or cached[1] else float("inf")  # the last answer, no sync
        full_key = (key, scale)
        if cached is not None and cached[0] == full_key:
            return cached[2]
        with torch.no_grad():
            flat = skew.detach().flatten(0, -3)
            frobenius = flat.flatten(-2).norm(dim=-1) if flat.numel() else flat.new_zeros(1)
            bound = float(frobenius.max())
            if neumann and bound >= NEUMANN_LIMIT:  # the cheap bound fails: the exact |S|_2 decides
                bound = float(torch.linalg.matrix_norm(flat[frobenius >= NEUMANN_LIMIT], ord=2).max())
        ok = bound < NEUMANN_LIMIT
        self._neumann_check = (full_key, ok, bound)
        if neumann and not ok:
            _warn_neumann_fallback(bound)
        return bound

    @torch.no_grad()
    def constrain_(self) -> None:
        """COFT: clip each block's Frobenius norm |S_i|_F to the radius coft_eps.  Neumann mode: re-check
        the series' range here too (eager, after each optimizer step), so compiled forwards see it."""
        eps = self.config.coft_eps
        if eps is not None:
            # |S|_F^2 = 2 |strict upper triangle|^2 for a skew-symmetric S.
            norms = self.skew.float().norm(dim=-1, keepdim=True) * (2**0.5)
            factor = torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
            self.skew.mul_(factor.to(self.skew.dtype))
        if self.config.cayley_mode == "neumann":
            self._skew_bound(self.skew_matrices(), 1.0, self.own_key())

    def extra_repr(self) -> str:
        m = self.n_factors(self.config)
        return f"{super().extra_repr()}, m={m}, n={self.num_blocks}, b={self.block_size}"


@register_method
class OFT(BOFT):
    """Orthogonal finetuning: one block-diagonal Cayley rotation; ``skew``: (n, b(b-1)/2)."""

    name = "oft"

    @classmethod
    def n_factors(cls, config: AdapterConfig) -> int:
        return 1

    @classmethod
    def skew_shape(cls, m: int, n: int, b: int) -> tuple[int, ...]:
        return (n, num_skew_params(b))
