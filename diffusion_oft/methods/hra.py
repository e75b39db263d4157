"""HRA (Yuan et al. 2024, "Bridging the gap between low-rank and orthogonal adaptation via Householder
reflection adaptation"): a product of r Householder reflections, as PEFT's ``HRAConfig``.

    D = H_1 H_2 ... H_r,   H_i = I - 2 u_i u_i^T / |u_i|^2,   W' = W D   (PEFT: new weight = W @ D)

so the layer computes x D^T W^T: the input-side transform is D^T (``side="output"``: W' = D^T W).  PEFT
stores ``hra_u`` (d_in, r); here one layer's ``u_in`` is (r, n, b): r vectors per block, blocks on axis
-2 as for every method (n = 1, one block of the whole width, is PEFT's HRA; more blocks give one product
of r reflections per block).  Initialisation (PEFT's): r/2 random vectors, each used twice in a row, so
D = I exactly at init (``init="identity"`` needs an even r; an odd r starts from r random reflections,
as PEFT does with a warning).  Exactly orthogonal for any u; applied as a rank-r update, never dense.

The product is built in compact form, D = I + Y T Y^T with thin Y (d, r) and a small upper block-
triangular T (r, r), from pairs: for unit a, b with p = a - b, q = a + b and c = a^T b = 1 - |p|^2 / 2,

    (I - 2s a a^T)(I - 2s b b^T) = I + [q, p] [[-s + s^2 c, -s^2 c], [s^2 c, -s - s^2 c]] [q, p]^T,

so a repeated vector (p = 0) gives exactly I, bit for bit, at s = 1 (no cancellation of rounded terms).
Scale s (``set_adapters`` weights) scales every reflection, I - 2s u u^T: I at 0, the trained product at 1
(orthogonal only there, as ETHER's).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import OrthoMethod, block_structure, register_method
from .transforms import BlockTransform, LowRankBlockTransform

if TYPE_CHECKING:
    from ..config import AdapterConfig

logger = logging.getLogger("diffusion_oft")
_odd_warned = False
_SIDE_SUFFIX = {"input": "in", "output": "out"}


def _pair_coefficients(p: torch.Tensor, scale: float) -> torch.Tensor:
    """(K, N, 2, 2) coefficients M of (I - 2s a a^T)(I - 2s b b^T) = I + [q, p] M [q, p]^T per pair and
    block, from p = a - b (K, N, b) of unit a, b (see the module docstring)."""
    c = 1.0 - 0.5 * p.square().sum(-1)  # a^T b, exact for unit vectors; 1 exactly when p = 0
    s2c = (scale * scale) * c
    row_q = torch.stack([s2c - scale, -s2c], dim=-1)
    row_p = torch.stack([s2c, -scale - s2c], dim=-1)
    return torch.stack([row_q, row_p], dim=-2)


def householder_product(vectors: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, T) with D = H_1 ... H_r = BlockDiag(I + Y_i T_i Y_i^T) for (r, N, b) vectors (any norm), H_i =
    I - 2s u^ u^T per block: Y (N, b, r), T (N, r, r) upper block-triangular, float32."""
    unit = F.normalize(vectors.float(), dim=-1, eps=1e-12)  # (r, N, b)
    r, n_blocks, _ = unit.shape
    pairs = r // 2
    a, b = unit[0 : 2 * pairs : 2], unit[1 : 2 * pairs : 2]  # (K, N, b) each
    q, p = a + b, a - b
    factors = [(torch.stack([q[k], p[k]], dim=-1), None) for k in range(pairs)]  # Q_k: (N, b, 2)
    coeffs = _pair_coefficients(p, scale) if pairs else None  # (K, N, 2, 2)
    blocks = [coeffs[k] for k in range(pairs)]
    if r % 2:  # the last reflection alone: I - 2s u u^T = I + u (-2s) u^T
        factors.append((unit[-1].unsqueeze(-1), None))
        blocks.append(torch.full((n_blocks, 1, 1), -2.0 * scale, device=unit.device))
    y = torch.cat([f for f, _ in factors], dim=-1)  # (N, b, r): [q_1, p_1, q_2, p_2, ...]
    gram = torch.bmm(y.transpose(1, 2), y)  # (N, r, r)
    # (I + Y_a T_a Y_a^T)(I + Q M Q^T) = I + [Y_a, Q] [[T_a, T_a (Y_a^T Q) M], [0, M]] [Y_a, Q]^T
    t = blocks[0]
    start = t.shape[-1]
    for m in blocks[1:]:
        width = m.shape[-1]
        top = torch.bmm(torch.bmm(t, gram[:, :start, start : start + width]), m)
        bottom = torch.cat([m.new_zeros(n_blocks, width, start), m], dim=-1)
        t = torch.cat([torch.cat([t, top], dim=-1), bottom], dim=-2)
        start += width
    return y, t


class HRA(OrthoMethod):
    """Householder reflection adaptation: r reflections per block on one side; ``u_in`` (or ``u_out``):
    (r, n, b)."""

    name = "hra"
    label = "HRA"
    config_defaults = {"num_blocks": 1, "n_reflections": 8}  # PEFT's HRAConfig: r = 8 over the whole width
    exclusive_fields = ("n_reflections",)
    cli_options = {"n_reflections": dict(type=int, help="HRA's r, Householder reflections per block (default 8)")}
    # Not a paper's setting (not tuned here): r = 8 as PEFT, ETHER's learning-rate range (both are
    # Householder methods of normalised vectors).
    training_defaults = {
        "dreambooth": dict(
            num_blocks=1, learning_rate=5e-3, max_train_steps=1000, adam_weight_decay=0.0, adapter_dropout=0.0
        ),
        "control": dict(num_blocks=1, learning_rate=1e-3, adam_weight_decay=0.0, adapter_dropout=0.0, train_ff=False),
        "demo": dict(learning_rate=1e-2),
    }
    peft_type = "HRA"
    tensor_names = ("u_in", "u_out")

    @classmethod
    def validate_config(cls, config: AdapterConfig) -> None:
        r = config.n_reflections
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"n_reflections must be a positive integer, got {r!r}")
        if config.init == "identity" and r % 2:
            raise ValueError(f"HRA starts at the identity with an even n_reflections only (pairs), got {r}")

    @classmethod
    def own_parameter_shapes(cls, in_features: int, out_features: int, config: AdapterConfig) -> dict:
        n, b = block_structure(cls.side_dim(config.side, in_features, out_features), config)
        return {f"u_{_SIDE_SUFFIX[config.side]}": (config.n_reflections, n, b)}

    @classmethod
    def input_width(cls, config: AdapterConfig, tensor_name: str, shape: tuple[int, ...]) -> int | None:
        return shape[1] * shape[2] if tensor_name == "u_in" and len(shape) == 3 else None

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__(in_features, out_features, config)
        ((self._vector_name, shape),) = self.own_parameter_shapes(in_features, out_features, config).items()
        self.register_parameter(self._vector_name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    @property
    def vectors(self) -> nn.Parameter:
        return self._parameters[self._vector_name]

    def reset_parameters(self) -> None:
        u = self.vectors
        r = u.shape[0]
        with torch.no_grad():
            if self.config.init == "random" or r % 2:
                if self.config.init != "random":
                    _warn_odd(r)
                _kaiming_columns(u)
            else:  # PEFT's symmetric init: each vector twice in a row, D = I exactly
                half = torch.empty(r // 2, *u.shape[1:])
                _kaiming_columns(half)
                u.copy_(half.repeat_interleave(2, dim=0))
        if self.magnitude is not None:
            nn.init.ones_(self.magnitude)

    def block_parameters(self) -> dict[str, torch.Tensor]:
        return {self._vector_name: self.vectors}

    def build_transforms(
        self, params: dict[str, torch.Tensor], key: tuple, scale: float = 1.0, dropout: bool = False
    ) -> dict[str, BlockTransform]:
        y, t = householder_product(params[self._vector_name], scale)
        right = torch.bmm(y, t)  # D^T = I + Y T^T Y^T = I + U V^T with U = Y, V = Y T
        keep = self.block_keep_mask((y.shape[0],), y.device, dropout)
        if keep is not None:
            right = right * keep[:, None, None]  # a dropped block becomes I
        return {self.config.side: LowRankBlockTransform(y, right)}

    def extra_repr(self) -> str:
        r, n, b = self.vectors.shape
        return f"{super().extra_repr()}, r={r}, n={n}, b={b}"


def _warn_odd(r: int) -> None:
    global _odd_warned
    if not _odd_warned:  # as PEFT: the symmetric (identity) init needs pairs
        _odd_warned = True
        logger.warning("HRA with an odd n_reflections=%d starts from random reflections, not I (warned once)", r)


def _kaiming_columns(u: torch.Tensor) -> None:
    """PEFT's kaiming_uniform_(a=sqrt(5)) of its (d, r) ``hra_u``, drawn here as the (r, n, b) layout's
    transpose: the same bound 1/sqrt(r) (fan_in of a (d, r) matrix is r)."""
    bound = 1.0 / math.sqrt(u.shape[0])
    u.uniform_(-bound, bound)


register_method(HRA)
