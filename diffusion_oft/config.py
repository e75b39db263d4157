"""AdapterConfig: what to adapt and how, validated up front, serialisable to JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .methods.base import exclusive_fields, field_owners, get_method_class, method_names

# The registered methods (each method's facts live on its class in diffusion_oft.methods).
METHODS = method_names()
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# DiT (SD3 / SD3.5 MMDiT, FLUX.1) default targets: the joint attention's image projections and its text
# ("context") projections.  In Flux's single blocks the same suffixes select their attention's to_q/k/v
# (they have no to_out: attention and MLP share proj_out).  Widths: SD3 / SD3.5 Medium 1536, SD3.5 Large
# 2432, FLUX.1 3072; all are divisible by the per-method defaults (OFT b=32, BOFT b=8, ETHER n=4).
JOINT_ATTENTION_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
# The feed-forward, for extra_target_modules: the image and text MLPs of joint blocks and the MLP input of
# Flux's single blocks (proj_mlp).  Their shared attention + MLP output (proj_out) is left out: the suffix
# "proj_out" also selects the transformer's final output projection.
DIT_FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
# Default target_modules per model class (unknown classes: DEFAULT_TARGETS).
DEFAULT_TARGETS_BY_MODEL: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": DEFAULT_TARGETS,
    "ControlNetModel": DEFAULT_TARGETS,
    "SD3Transformer2DModel": JOINT_ATTENTION_TARGETS,
    "FluxTransformer2DModel": JOINT_ATTENTION_TARGETS,
    "CLIPTextModel": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "CLIPTextModelWithProjection": ("q_proj", "k_proj", "v_proj", "out_proj"),
}


def default_target_modules(model: Any) -> tuple[str, ...]:
    """The default ``target_modules`` for a model (or its class name): DEFAULT_TARGETS_BY_MODEL."""
    name = model if isinstance(model, str) else type(getattr(model, "_orig_mod", model)).__name__
    return DEFAULT_TARGETS_BY_MODEL.get(name, DEFAULT_TARGETS)


@dataclass
class AdapterConfig:
    """Configuration of one orthogonal adapter.

    Structure: give ``block_size`` (b, the same for every layer) or ``num_blocks`` (n, the
    block size is then dim / n per layer), not both; when neither is given the method's
    default is used (its class's ``config_defaults``: oft b=32; boft b=8, m=2; ether/ether_plus n=4;
    hra n=1, r=8).  Fields that only some methods read (``exclusive_fields``: n_butterfly_factors,
    coft_eps, n_reflections) are refused by the others.

    Side: ``side="input"`` (the papers', PEFT's) rotates each weight's input, W' = W R^T;
    ``side="output"`` (kohya / LyCORIS) its output, W' = R W.  Only output-side OFT / BOFT export
    as LyCORIS ``oft_blocks`` (``convert --to kohya``); ``--to lora``, ``diff`` and ``merged`` take
    either.  The training scripts set it with ``--side``.  Two-sided ETHER+ acts on both sides.
    """

    method: str = "oft"
    block_size: int | None = None
    num_blocks: int | None = None
    n_butterfly_factors: int = 1  # BOFT's m; OFT is m = 1
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    attention: str = "all"  # "self" | "cross" | "all": which attention modules' projections
    extra_target_modules: tuple[str, ...] = ()  # e.g. ("ff.net.0.proj", "ff.net.2"), any attention
    side: str = "input"  # "input" (papers, PEFT): W' = W R^T;  "output" (kohya/LyCORIS): W' = R W
    coft_eps: float | None = None  # COFT radius on each block's |S|_F (oft/boft); None = off
    cayley_mode: str = "exact"  # "exact" | "neumann"
    neumann_terms: int = 5
    magnitude: bool = False  # learned per-output-neuron scale (BOFT's s), init 1
    dropout: float = 0.0  # multiplicative block dropout (blocks replaced by I in training)
    ether_plus_two_sided: bool = True  # ETHER+: H~ W H (both sides) or only on `side`
    init: str = "default"  # "default" (paper init) | "identity" | "random" (tests, benchmarks)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept in the file
    n_reflections: int | None = None  # HRA's r (Householder reflections per block); None: the method's default

    def __post_init__(self) -> None:
        for name in ("target_modules", "extra_target_modules"):
            value = getattr(self, name)
            items = tuple(value) if isinstance(value, (list, tuple)) else None
            if items is None or not all(isinstance(v, str) for v in items):
                raise ValueError(f"{name} must be a list of module name suffixes (strings), got {value!r}")
            setattr(self, name, items)
        for name in ("n_butterfly_factors", "neumann_terms"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("magnitude", "ether_plus_two_sided"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        method_cls = get_method_class(self.method)
        if self.block_size is not None and self.num_blocks is not None:
            raise ValueError("give block_size or num_blocks, not both")
        defaults = method_cls.config_defaults
        if self.block_size is None and self.num_blocks is None:
            self.block_size = defaults.get("block_size")
            self.num_blocks = defaults.get("num_blocks")
            if "n_butterfly_factors" in defaults and self.n_butterfly_factors == 1:
                self.n_butterfly_factors = defaults["n_butterfly_factors"]
        for name, value in defaults.items():  # the method's other fields, when left unset
            if name not in ("block_size", "num_blocks", "n_butterfly_factors") and getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("block_size", "num_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_butterfly_factors < 1:
            raise ValueError(f"n_butterfly_factors must be >= 1, got {self.n_butterfly_factors}")
        for name in exclusive_fields():  # fields of other methods stay at their defaults
            if name not in method_cls.exclusive_fields and getattr(self, name) != _FIELD_DEFAULTS[name]:
                raise ValueError(f"{name} applies to {' and '.join(field_owners(name))} only (method={self.method!r})")
        if self.attention not in ("self", "cross", "all"):
            raise ValueError(f"attention must be 'self', 'cross' or 'all', got {self.attention!r}")
        if self.side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {self.side!r}")
        if self.cayley_mode not in ("exact", "neumann"):
            raise ValueError(f"cayley_mode must be 'exact' or 'neumann', got {self.cayley_mode!r}")
        if self.neumann_terms < 1:
            raise ValueError(f"neumann_terms must be >= 1, got {self.neumann_terms}")
        if self.coft_eps is not None and self.coft_eps <= 0:
            raise ValueError(f"coft_eps must be > 0 (or None to disable COFT), got {self.coft_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "identity", "random"):
            raise ValueError(f"init must be 'default', 'identity' or 'random', got {self.init!r}")
        if not self.target_modules and not self.extra_target_modules:
            raise ValueError("no target modules given")
        method_cls.validate_config(self)

    # Fields added after format version 1: written only when set, so files of the methods that do not
    # use them stay exactly what diffusion-oft 0.1.0 reads.
    _OPTIONAL_FIELDS = ("n_reflections",)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["extra_target_modules"] = list(self.extra_target_modules)
        for name in self._OPTIONAL_FIELDS:
            if data[name] is None:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; this file may come from a newer version")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AdapterConfig)}
