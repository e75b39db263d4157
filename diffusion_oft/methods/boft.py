"""OFT and BOFT: products of butterfly-permuted block-diagonal Cayley rotations.

BOFT (Liu et al. 2024): R = B_m ... B_1, B_i = P_i BlockDiag(Cayley(S_i1), ..., Cayley(S_in)) P_i^T,
with P_1 = I.  OFT (Qiu et al. 2023) is the case m = 1.  Each S is skew-symmetric and stored as
its strict upper triangle: m * n * b(b-1)/2 numbers per layer, zero at init (R = I).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import OrthoMethod, block_structure, register_method
from .cayley import SERIES_MAX_NORM, cayley, num_skew_params, series_factors, skew_from_triu
from .placement import collapse_butterfly
from .transforms import BlockTransform, ButterflyTransform

if TYPE_CHECKING:
    from ..config import AdapterConfig

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
            "convergence; those blocks use the exact Cayley transform until |S| is back inside "
            "(warned once)",
            bound,
            NEUMANN_LIMIT,
        )


class BOFT(OrthoMethod):
    """Butterfly orthogonal finetuning; parameter ``skew``: (m, n, b(b-1)/2)."""

    name = "boft"
    label = "BOFT"
    config_defaults = {"block_size": 8, "n_butterfly_factors": 2}
    exclusive_fields = ("n_butterfly_factors", "coft_eps")
    cli_options = {
        "n_butterfly_factors": dict(type=int, help="BOFT's m (default 2)"),
        "coft_eps": dict(
            type=float, help="COFT radius on each block's |S|_F, applied after every step (oft/boft; default off)"
        ),
    }
    # BOFT's reference DreamBooth scripts (Liu et al. 2024): 8 blocks, lr 3e-5, dropout 0.1, ~1000 steps;
    # m = 2 butterfly factors (m = 1 would be plain OFT).
    training_defaults = {
        "dreambooth": dict(
            num_blocks=8,
            n_butterfly_factors=2,
            learning_rate=3e-5,
            max_train_steps=1000,
            adam_weight_decay=1e-2,
            adapter_dropout=0.1,
        ),
        "control": dict(
            num_blocks=8,
            n_butterfly_factors=2,
            learning_rate=1e-5,
            adam_weight_decay=1e-2,
            adapter_dropout=0.0,
            train_ff=False,
        ),
        "demo": dict(learning_rate=1e-2),
    }
    peft_type = "BOFT"
    lycoris_algo = "boft"
    tensor_names = ("skew",)

    @classmethod
    def input_width(cls, config: AdapterConfig, tensor_name: str, shape: tuple[int, ...]) -> int | None:
        if tensor_name != "skew" or len(shape) < 2:  # OFT (n, b(b-1)/2), BOFT (m, n, b(b-1)/2)
            return None
        t = shape[-1]
        b = round((1 + (1 + 8 * t) ** 0.5) / 2)
        return shape[-2] * b if num_skew_params(b) == t else None

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
        return {"skew": self._parameters["skew"]}

    def build_transforms(
        self, params: dict[str, torch.Tensor], key: tuple, scale: float = 1.0, dropout: bool = False
    ) -> dict[str, BlockTransform]:
        cfg = self.config
        skew = self.skew_matrices(scale, params["skew"])  # (m, n, b, b)
        mode, fallback, factors = self._cayley_plan(skew, scale, key)
        flat = skew.flatten(0, 1)
        series = mode == "series"
        blocks = cayley(flat, "exact" if series else mode, cfg.neumann_terms, series_ok=series, factors=factors)
        if fallback is not None:  # the few blocks outside the fast path's range: exact solve
            blocks = blocks.index_copy(0, fallback, cayley(flat.index_select(0, fallback), "exact"))
        blocks = blocks.view(skew.shape)
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
        if collapse_butterfly(rotation.span, m, self.block_size):
            rotation = rotation.collapsed()
        return {cfg.side: rotation}

    def _cayley_plan(self, skew: torch.Tensor, scale: float, key: tuple) -> tuple[str, torch.Tensor | None, int | None]:
        """How to build the rotations: a mode for all blocks ("series": the exact transform by the
        matmul-only product, "neumann", or "exact": solve), the indices (into the flattened blocks)
        of those that need the exact solve instead, or None, and the product's number of factors.
        The mode is decided per block, so which blocks are solved does not depend on the other blocks
        built with it (one layer or a batch of layers); the product's length follows the largest block
        (``cayley.series_factors``: results agree to float32 rounding whatever that length).

        Exact mode: the product when |S|_F <= SERIES_MAX_NORM.  Neumann mode: the series when
        |S|_2 < 1 (cheap |S|_F first, |S|_2 only where that fails), else exact, warned once.
        Computed on the host once per change of the parameters (``key``: their storage and in-place
        versions, bumped by every optimizer step or load) and scale: one sync per step.  Under
        torch.compile the exact mode solves and the Neumann mode reuses the last answer for all
        blocks (no graph break; ``constrain_``, run eagerly by ``apply_constraints``, refreshes it).
        """
        neumann = self.config.cayley_mode == "neumann"
        cached = getattr(self, "_neumann_check", None)
        if torch.compiler.is_compiling():
            if not neumann:
                return "exact", None, None
            return ("neumann" if cached is None or cached[1] else "exact"), None, None  # the last answer, no sync
        full_key = (key, scale)
        if cached is not None and cached[0] == full_key:
            return cached[2], cached[3], cached[4]
        with torch.no_grad():
            flat = skew.detach().flatten(0, -3)
            frobenius = flat.flatten(-2).norm(dim=-1)
            limit = NEUMANN_LIMIT if neumann else SERIES_MAX_NORM
            outside = frobenius >= limit if neumann else frobenius > limit
            norm_2 = 0.0
            if neumann and bool(outside.any()):  # the cheap bound fails: the exact |S|_2 decides
                candidates = outside.nonzero().flatten()
                spectral = torch.linalg.matrix_norm(flat[candidates], ord=2)
                norm_2 = float(spectral.max())
                outside = torch.zeros_like(outside)
                outside[candidates[spectral >= NEUMANN_LIMIT]] = True
            # One host sync for both: how many blocks are outside, and the largest |S|_F inside.
            n_outside, inside_max = torch.stack([outside.sum(), frobenius.masked_fill(outside, 0.0).max()]).tolist()
            n_outside = int(n_outside)
        mode = "neumann" if neumann else "series"
        fallback = None
        if n_outside == flat.shape[0] and n_outside:
            mode = "exact"
        elif n_outside:
            fallback = outside.nonzero().flatten()
        factors = series_factors(inside_max) if mode == "series" else None
        self._neumann_check = (full_key, n_outside == 0, mode, fallback, factors)
        if neumann and n_outside:
            _warn_neumann_fallback(norm_2)
        return mode, fallback, factors

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
            self._cayley_plan(self.skew_matrices(), 1.0, self.own_key())

    def extra_repr(self) -> str:
        m = self.n_factors(self.config)
        return f"{super().extra_repr()}, m={m}, n={self.num_blocks}, b={self.block_size}"


class OFT(BOFT):
    """Orthogonal finetuning: one block-diagonal Cayley rotation; ``skew``: (n, b(b-1)/2).

    Two structure defaults, on purpose: the library's ``AdapterConfig(method="oft")`` takes block size
    b = 32 (PEFT's ``oft_block_size`` default: a fixed cost per coordinate, the same config fits every
    width divisible by 32, 1.5 M parameters on SD 1.5's UNet), the training scripts take the OFT paper's
    r = 4 blocks (``training_defaults``: its DreamBooth and control settings, 11.6 M on SD 1.5).  Give
    ``block_size`` / ``num_blocks`` (``--block_size`` / ``--num_blocks``) to choose.
    """

    name = "oft"
    label = "OFT"
    config_defaults = {"block_size": 32}
    exclusive_fields = ("coft_eps",)
    # The OFT paper (Qiu et al. 2023): r = 4 blocks, lr 6e-5, ~1000 steps at batch 1; control lr 1e-5.
    training_defaults = {
        "dreambooth": dict(
            num_blocks=4, learning_rate=6e-5, max_train_steps=1000, adam_weight_decay=1e-2, adapter_dropout=0.0
        ),
        "control": dict(num_blocks=4, learning_rate=1e-5, adam_weight_decay=1e-2, adapter_dropout=0.0, train_ff=False),
        "demo": dict(block_size=8, learning_rate=1e-2),
    }
    peft_type = "OFT"
    lycoris_algo = "diag-oft"

    @classmethod
    def n_factors(cls, config: AdapterConfig) -> int:
        return 1

    @classmethod
    def skew_shape(cls, m: int, n: int, b: int) -> tuple[int, ...]:
        return (n, num_skew_params(b))


# Registered in the order the command line lists them.
register_method(OFT)
register_method(BOFT)
