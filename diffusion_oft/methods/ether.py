"""ETHER and ETHER+ (Bini et al. 2024): block-diagonal Householder-type transforms.

ETHER:  H_i = I - 2 u_i u_i^T / |u_i|^2 per block (an exact reflection, so it starts away from
        the identity by design).  One vector per block: `dim` numbers per layer for any n.
ETHER+: H+_i = I - u_i u_i^T/|u_i|^2 + v_i v_i^T/|v_i|^2, by default on both sides
        (W' = H~+ W H+); v = -u at init gives H+ = I.  Not orthogonal in general.
Both are applied as low-rank updates, never as dense matrices.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .base import OrthoMethod, block_structure, register_method
from .transforms import BlockTransform, LowRankBlockTransform

if TYPE_CHECKING:
    from ..config import AdapterConfig

_SIDE_SUFFIX = {"input": "in", "output": "out"}


def _unit(vec: torch.Tensor) -> torch.Tensor:
    return F.normalize(vec.float(), dim=-1, eps=1e-12)


class _HouseholderMethod(OrthoMethod):
    vector_names: tuple[str, ...] = ()  # per side: ("u",) or ("u", "v")
    config_defaults = {"num_blocks": 4}

    @classmethod
    def input_width(cls, config: AdapterConfig, tensor_name: str, shape: tuple[int, ...]) -> int | None:
        if tensor_name in tuple(f"{v}_in" for v in cls.vector_names) and len(shape) == 2:  # (n, b)
            return shape[0] * shape[1]
        return None

    @classmethod
    def own_parameter_shapes(cls, in_features: int, out_features: int, config: AdapterConfig) -> dict:
        shapes = {}
        for side in cls.sides(config):
            n, b = block_structure(cls.side_dim(side, in_features, out_features), config)
            for vec in cls.vector_names:
                shapes[f"{vec}_{_SIDE_SUFFIX[side]}"] = (n, b)
        return shapes

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__(in_features, out_features, config)
        shapes = self.own_parameter_shapes(in_features, out_features, config)
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
        self._block_names = tuple(shapes)
        self.reset_parameters()

    def vectors(self, side: str) -> list[torch.Tensor]:
        return [getattr(self, f"{vec}_{_SIDE_SUFFIX[side]}") for vec in self.vector_names]

    def block_parameters(self) -> dict[str, torch.Tensor]:
        return {name: self._parameters[name] for name in self._block_names}

    def _left_and_right(self, vectors: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, b, k) U and V with H = I + U V^T per block, from one side's (n, b) vectors."""
        raise NotImplementedError

    def build_transforms(
        self, params: dict[str, torch.Tensor], key: tuple, scale: float = 1.0, dropout: bool = False
    ) -> dict[str, BlockTransform]:
        out = {}
        for side in self.sides(self.config):
            vectors = [params[f"{vec}_{_SIDE_SUFFIX[side]}"] for vec in self.vector_names]
            left, right = self._left_and_right(vectors, scale)
            keep = self.block_keep_mask((left.shape[0],), left.device, dropout)
            if keep is not None:
                right = right * keep[:, None, None]  # a dropped block becomes I
            out[side] = LowRankBlockTransform(left, right)
        return out


@register_method
class ETHER(_HouseholderMethod):
    """Block-diagonal Householder reflection on one side; parameter ``u_in`` (or ``u_out``): (n, b)."""

    name = "ether"
    label = "ETHER"
    vector_names = ("u",)
    tensor_names = ("u_in", "u_out")
    # ETHER (Bini et al. 2024): n = 4 blocks (any n: the same parameter count), lr 6e-3, weight decay 0,
    # ~1200 steps; control: lr 1e-3 with the feed-forward projections adapted as well.
    training_defaults = {
        "dreambooth": dict(
            num_blocks=4, learning_rate=6e-3, max_train_steps=1200, adam_weight_decay=0.0, adapter_dropout=0.0
        ),
        "control": dict(num_blocks=4, learning_rate=1e-3, adam_weight_decay=0.0, adapter_dropout=0.0, train_ff=True),
        "demo": dict(learning_rate=6e-3),
    }

    def reset_parameters(self) -> None:
        if self.config.init == "identity":
            raise ValueError("ETHER is a reflection and cannot start at the identity; use ether_plus for that")
        for vec in self.vectors(self.config.side):
            nn.init.kaiming_uniform_(vec, a=math.sqrt(5))
        if self.magnitude is not None:
            nn.init.ones_(self.magnitude)

    def _left_and_right(self, vectors: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # H = I - 2 s u^ u^T: s = 1 is the reflection, s = 0 the identity (orthogonal only at 0 and 1).
        (u,) = vectors
        unit = _unit(u).unsqueeze(-1)  # (n, b, 1)
        return unit, unit * (-2.0 * scale)


@register_method
class ETHERPlus(_HouseholderMethod):
    """ETHER+ with vectors ``u_in, v_in`` (and ``u_out, v_out`` when two-sided): (n, b) each."""

    name = "ether_plus"
    label = "ETHER+"
    vector_names = ("u", "v")
    tensor_names = ("u_in", "v_in", "u_out", "v_out")
    training_defaults = {
        "dreambooth": dict(
            num_blocks=4, learning_rate=6e-3, max_train_steps=1200, adam_weight_decay=0.0, adapter_dropout=0.0
        ),
        "control": dict(num_blocks=4, learning_rate=1e-3, adam_weight_decay=0.0, adapter_dropout=0.0, train_ff=True),
        "demo": dict(learning_rate=1e-2),
    }

    @classmethod
    def sides(cls, config: AdapterConfig) -> tuple[str, ...]:
        return ("input", "output") if config.ether_plus_two_sided else (config.side,)

    def reset_parameters(self) -> None:
        for side in self.sides(self.config):
            u, v = self.vectors(side)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
            if self.config.init == "random":
                nn.init.kaiming_uniform_(v, a=math.sqrt(5))
            else:  # v = -u: H+ = I - uu^T + uu^T = I exactly
                with torch.no_grad():
                    v.copy_(-u)
        if self.magnitude is not None:
            nn.init.ones_(self.magnitude)

    def _left_and_right(self, vectors: list[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        # -u^u^T + v^v^T = -1/2 (p q^T + q p^T) = [p, q] [-q/2, -p/2]^T with p = u^ + v^, q = u^ - v^.
        # At init v = -u, so p = 0 exactly and H+ = I holds bit for bit (no cancellation of two
        # rounded terms).
        u, v = (_unit(x) for x in vectors)
        p, q = u + v, u - v
        return torch.stack([p, q], dim=-1), torch.stack([q, p], dim=-1) * (-0.5 * scale)  # (n, b, 2) each
