"""OFT and BOFT: products of butterfly-permuted block-diagonal Cayley rotations.

BOFT (Liu et al. 2024): R = B_m ... B_1, B_i = P_i BlockDiag(Cayley(S_i1), ..., Cayley(S_in)) P_i^T,
with P_1 = I.  OFT (Qiu et al. 2023) is the case m = 1.  Each S is skew-symmetric and stored as
its strict upper triangle: m * n * b(b-1)/2 numbers per layer, zero at init (R = I).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from .base import OrthoMethod, block_structure, register_method
from .cayley import cayley, num_skew_params, skew_from_triu
from .transforms import BlockTransform, ButterflyTransform


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

    def skew_matrices(self, scale: float = 1.0) -> torch.Tensor:
        """(m, n, b, b) float32 skew-symmetric generators, one per block and factor."""
        m = self.n_factors(self.config)
        vec = self.skew.float().reshape(m, self.num_blocks, -1)
        return skew_from_triu(vec * scale if scale != 1.0 else vec, self.block_size)

    def transforms(self, scale: float = 1.0, dropout: bool = False) -> dict[str, BlockTransform]:
        cfg = self.config
        blocks = cayley(self.skew_matrices(scale), cfg.cayley_mode, cfg.neumann_terms)  # (m, n, b, b)
        keep = self.block_keep_mask(blocks.shape[:2], blocks.device, dropout)
        if keep is not None:
            eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
            keep = keep[..., None, None]
            blocks = keep * blocks + (1 - keep) * eye
        m = blocks.shape[0]
        # R = B_m ... B_1 (B_i of butterfly level i - 1): in multiplication order the highest level first.
        rotation = ButterflyTransform(blocks.flip(0), list(reversed(range(m))))
        # m factors only mix coordinates within chunks of b * 2**(m-1): when such chunks are small, one
        # block-diagonal matmul with the product's blocks is cheaper than m matmuls + 2m shuffles.
        if m > 1 and rotation.span <= max(2 * m * self.block_size, 32):
            rotation = rotation.collapsed()
        return {cfg.side: rotation}

    @torch.no_grad()
    def constrain_(self) -> None:
        """COFT: clip each block's Frobenius norm |S_i|_F to the radius coft_eps."""
        eps = self.config.coft_eps
        if eps is None:
            return
        # |S|_F^2 = 2 |strict upper triangle|^2 for a skew-symmetric S.
        norms = self.skew.float().norm(dim=-1, keepdim=True) * (2**0.5)
        factor = torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
        self.skew.mul_(factor.to(self.skew.dtype))

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
