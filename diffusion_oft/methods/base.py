"""The one engine: a method is parameters + how to build its structured transform(s).

A method module lives inside an adapted projection (see ``diffusion_oft.layers``).  It answers:
  * ``parameter_shapes``: the tensors it stores (for validation before touching a model),
  * ``build_transforms(params, key, scale)``: its map(s) per side, as ``BlockTransform`` objects
    in float32, from its block parameters (``block_parameters``: every one has its blocks on axis
    -2) -- its own, or those of many layers concatenated along that axis, which gives their
    direct sum: ``diffusion_oft.batching`` builds a whole model's transforms in one call this way,
  * ``constrain_()``: an optional projection after each optimizer step (COFT).
The class is also the one place of the method's facts (class attributes, read by ``config``,
``training.args``, ``commands``, ``convert`` and ``inference``): its ``AdapterConfig`` defaults and
the fields only it reads, its training defaults, its checks, its formats' names, its base-model hints.
Everything else (targeting, merging, files, training) is method-agnostic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from .transforms import BlockTransform

if TYPE_CHECKING:  # the config floor asks this one (never the other way round at run time)
    from ..config import AdapterConfig

METHOD_REGISTRY: dict[str, type[OrthoMethod]] = {}


class SharedBuild(Protocol):
    """A build of several layers' transforms at once (``diffusion_oft.batching.TransformBatch``)."""

    def transforms_of(self, method: OrthoMethod, scale: float, dropout: bool) -> dict[str, BlockTransform] | None: ...


def register_method(cls: type[OrthoMethod]) -> type[OrthoMethod]:
    METHOD_REGISTRY[cls.name] = cls
    return cls


def get_method_class(name: str) -> type[OrthoMethod]:
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHOD_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order (``methods/__init__``)."""
    return tuple(METHOD_REGISTRY)


def method_by(**facts: Any) -> type[OrthoMethod]:
    """The registered method whose class attributes have these values, e.g. ``method_by(peft_type="OFT")``
    (format readers name the method this way)."""
    for cls in METHOD_REGISTRY.values():
        if all(getattr(cls, key) == value for key, value in facts.items()):
            return cls
    raise ValueError(f"no method with {facts}")


def field_owners(field: str) -> tuple[str, ...]:
    """The methods that read an ``exclusive_fields`` entry (all others refuse a non-default value)."""
    return tuple(name for name, cls in METHOD_REGISTRY.items() if field in cls.exclusive_fields)


def exclusive_fields() -> tuple[str, ...]:
    """Every field some method declares as its own, in registration order."""
    seen: dict[str, None] = {}
    for cls in METHOD_REGISTRY.values():
        seen.update(dict.fromkeys(cls.exclusive_fields))
    return tuple(seen)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def block_structure(dim: int, config: AdapterConfig, multiple: int = 1, even: bool = False) -> tuple[int, int]:
    """(num_blocks, block_size) for a dimension, or a ValueError that says which values work.

    multiple: the number of blocks must be a multiple of this (BOFT: 2**(m-1)).
    even: the block size must be even (BOFT with m > 1).
    """

    def ok(n: int, b: int) -> bool:
        return n * b == dim and n % multiple == 0 and (not even or b % 2 == 0)

    if config.block_size is not None:
        b = config.block_size
        n = dim // b if dim % b == 0 else 0
        if n and ok(n, b):
            return n, b
        good = [b2 for b2 in _divisors(dim) if ok(dim // b2, b2) and b2 > 1]
        raise ValueError(
            f"block_size={b} does not fit dimension {dim}"
            + (f" with n_butterfly_factors={config.n_butterfly_factors}" if multiple > 1 else "")
            + f"; block sizes that work for {dim}: {good}"
        )
    n = config.num_blocks
    b = dim // n if dim % n == 0 else 0
    if b and ok(n, b):
        return n, b
    good = [n2 for n2 in _divisors(dim) if ok(n2, dim // n2)]
    raise ValueError(
        f"num_blocks={n} does not fit dimension {dim}"
        + (f" with n_butterfly_factors={config.n_butterfly_factors}" if multiple > 1 else "")
        + f"; block counts that work for {dim}: {good}"
    )


class OrthoMethod(nn.Module):
    """Base class of the adapter methods; subclasses define parameters and transforms, and state
    their facts in the class attributes below (the only place they are written)."""

    name: ClassVar[str] = ""  # AdapterConfig.method, file metadata, --method
    label: ClassVar[str] = ""  # in prose and messages: "OFT", "ETHER+"
    # AdapterConfig fields filled when the config leaves them unset: the structure (used when neither
    # block_size nor num_blocks is given) and any field the method needs another value of (BOFT's m).
    config_defaults: ClassVar[dict[str, Any]] = {}
    # AdapterConfig fields only this method (and its subclasses, unless they redeclare) reads; a config
    # of another method must leave them at their dataclass defaults.
    exclusive_fields: ClassVar[tuple[str, ...]] = ()
    # Defaults of the command-line tools per task (the papers' settings, see README "Train a subject"):
    # "dreambooth" / "control" (training.args: structure, learning rate, ...), "demo" (commands.demo).
    training_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # Command-line flags of its exclusive fields: {field: argparse keywords} (training.args adds them).
    cli_options: ClassVar[dict[str, dict[str, Any]]] = {}
    # File formats: PEFT's peft_type and LyCORIS's algo for this method, None where they have none.
    peft_type: ClassVar[str | None] = None
    lycoris_algo: ClassVar[str | None] = None
    # The tensor names one layer stores (besides "magnitude"), for messages about unreadable files.
    tensor_names: ClassVar[tuple[str, ...]] = ()

    # ---- facts that depend on a config ------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: AdapterConfig) -> None:
        """Checks of a config beyond the generic ones (ValueError with a one-line reason)."""

    @classmethod
    def input_width(cls, config: AdapterConfig, tensor_name: str, shape: tuple[int, ...]) -> int | None:
        """A projection's input width from one of the tensors this method stores for it (None when that
        tensor does not tell): ``inference.base_model_hints`` names the base model from it."""
        return None

    @classmethod
    def transforms_input(cls, config: AdapterConfig) -> bool:
        """Whether the adapter acts on its layers' input side (its tensors then give the input widths)."""
        return "input" in cls.sides(config)

    # Set from outside, by ``diffusion_oft.batching.group_methods`` (``add_adapter``): the shared build of
    # this adapter's layers with the same block shapes, which ``OrthoLinear`` asks first in training.
    transform_batch: SharedBuild | None = None

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        # Optional learned per-output-neuron scale s: W' = diag(s) (R-transformed W).
        self.magnitude = nn.Parameter(torch.ones(out_features)) if config.magnitude else None

    # ---- static description (no module needed) -------------------------------------------------
    @classmethod
    def sides(cls, config: AdapterConfig) -> tuple[str, ...]:
        """The sides ("input", "output") this method transforms."""
        return (config.side,)

    @classmethod
    def side_dim(cls, side: str, in_features: int, out_features: int) -> int:
        return in_features if side == "input" else out_features

    @classmethod
    def own_parameter_shapes(cls, in_features: int, out_features: int, config: AdapterConfig) -> dict:
        raise NotImplementedError

    @classmethod
    def parameter_shapes(cls, in_features: int, out_features: int, config: AdapterConfig) -> dict:
        """{parameter name: shape} of everything this method stores for one layer."""
        shapes = dict(cls.own_parameter_shapes(in_features, out_features, config))
        if config.magnitude:
            shapes["magnitude"] = (out_features,)
        return shapes

    @classmethod
    def num_parameters(cls, in_features: int, out_features: int, config: AdapterConfig) -> int:
        total = 0
        for shape in cls.parameter_shapes(in_features, out_features, config).values():
            count = 1
            for s in shape:
                count *= s
            total += count
        return total

    @classmethod
    def check_dims(cls, in_features: int, out_features: int, config: AdapterConfig) -> str | None:
        """Why this layer cannot carry the method, or None."""
        try:
            cls.own_parameter_shapes(in_features, out_features, config)
        except ValueError as err:
            return str(err)
        return None

    # ---- behaviour ---------------------------------------------------------------------------------
    def block_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters the transforms are built from, each with its blocks on axis -2."""
        raise NotImplementedError

    def own_key(self) -> tuple:
        """Identifies the current values of ``block_parameters`` (storage and in-place version)."""
        return tuple((p.data_ptr(), p._version) for p in self.block_parameters().values())

    def build_transforms(
        self, params: dict[str, torch.Tensor], key: tuple, scale: float = 1.0, dropout: bool = False
    ) -> dict[str, BlockTransform]:
        """{side: transform} in float32 from ``params`` (shaped like ``block_parameters`` except on
        axis -2); ``key`` identifies their values (for host-side checks cached per change)."""
        raise NotImplementedError

    def transforms(self, scale: float = 1.0, dropout: bool = False) -> dict[str, BlockTransform]:
        """{side: transform} in float32. ``scale`` moves along the method's path from I (0);
        ``dropout`` applies the multiplicative block dropout (training forward passes only)."""
        return self.build_transforms(self.block_parameters(), self.own_key(), scale, dropout)

    def reset_parameters(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def constrain_(self) -> None:
        """Projection applied after an optimizer step (COFT); no-op by default."""

    def block_keep_mask(self, shape: tuple[int, ...], device: torch.device, dropout: bool) -> torch.Tensor | None:
        """Multiplicative block dropout: 1 = keep the block, 0 = replace it by I."""
        if not (dropout and self.config.dropout > 0):
            return None
        return torch.bernoulli(torch.full(shape, 1.0 - self.config.dropout, device=device))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, sides={self.sides(self.config)}"
