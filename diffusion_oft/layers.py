"""OrthoLinear: a frozen nn.Linear carrying one or more orthogonal adapters.

The adapted weight of one adapter is   W' = diag(s) . R_out . W . R_in^T   (bias unchanged), where
R_in / R_out are the method's transforms on the input / output side (identity when absent) and s
the optional magnitude.  Several active adapters compose in order: W -> W'_1 -> W'_2 -> ...

How the transform is applied (the cost rule, per call; T = tokens, c = cost of one row transform):
  * gradient enabled (training): transform the activations, x -> x R_in, y -> y R_out^T.  Costs
    ~3 T c per side and needs no weight gradient; transforming the weight would cost c per weight
    row plus the full weight-gradient matmul (2 T d_in d_out) that a frozen layer never pays.
  * no gradient (inference): the transformed weight is computed once per parameter change,
    cached, and the call runs at the frozen layer's cost (``merge_adapter`` removes even the
    cache's memory).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .methods.base import OrthoMethod
from .methods.transforms import BlockTransform


def _apply_to_weight(
    weight: torch.Tensor, transforms: dict[str, BlockTransform], magnitude: torch.Tensor | None
) -> torch.Tensor:
    """W (out, in) -> diag(s) R_out W R_in^T, in the dtype of ``weight``."""
    if "input" in transforms:
        weight = transforms["input"].right_mul(weight, transpose=True)  # W R_in^T
    if "output" in transforms:
        weight = transforms["output"].right_mul(weight.t(), transpose=True).t()  # R_out W
    if magnitude is not None:
        weight = weight * magnitude.to(weight.dtype)[:, None]
    return weight


class OrthoLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) and applies orthogonal adapters.

    Exposes ``weight``, ``bias``, ``in_features`` and ``out_features`` of the base layer, so code
    that inspects projections keeps working.  Adapters live in ``ortho_adapters`` (ModuleDict).
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"OrthoLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.ortho_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.adapter_scales: dict[str, float] = {}
        self.merged_adapters: list[str] = []  # adapters folded into base_layer.weight, in order
        self.adapters_enabled = True
        self.call_scale: float | None = None  # per-call multiplier set by OrthoAttnProcessor
        self._cache: tuple[tuple, torch.Tensor] | None = None

    # ---- nn.Linear look-alike ----------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # ---- adapter bookkeeping -----------------------------------------------------------------------
    def add_adapter(self, name: str, method: OrthoMethod, scale: float = 1.0) -> None:
        if name in self.ortho_adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged_adapters:
            raise RuntimeError("unmerge the adapters before adding another one")
        w = self.base_layer.weight
        self.ortho_adapters[name] = method.to(device=w.device)
        self.active_adapters.append(name)
        self.adapter_scales[name] = scale
        self._cache = None

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge it before deleting")
        del self.ortho_adapters[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self.adapter_scales.pop(name, None)
        self._cache = None

    def set_active_adapters(self, names: list[str], scales: dict[str, float] | None = None) -> None:
        missing = [n for n in names if n not in self.ortho_adapters]
        if missing:
            raise ValueError(f"unknown adapters {missing}; this layer has {list(self.ortho_adapters)}")
        if self.merged_adapters:
            raise RuntimeError("unmerge the adapters before changing which ones are active")
        self.active_adapters = list(names)
        if scales:
            self.adapter_scales.update(scales)
        self._cache = None

    def _pending(self) -> list[str]:
        """Active adapters that are not merged and must be applied at call time."""
        if not self.adapters_enabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def _scale(self, name: str) -> float:
        scale = self.adapter_scales.get(name, 1.0)
        return scale if self.call_scale is None else scale * self.call_scale

    def _transforms(self, name: str, dropout: bool = False) -> tuple[dict[str, BlockTransform], torch.Tensor | None]:
        method = self.ortho_adapters[name]
        # Built in float32 even under fp16/bf16 autocast; in training, together with the adapter's
        # other layers when it can (one batched build per step, see ``diffusion_oft.batching``).
        device_type = method_device(method).type
        batch = method.transform_batch
        autocast = torch.is_autocast_enabled(device_type)
        with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
            transforms = batch and batch.transforms_of(method, self._scale(name), dropout)
            if transforms is None:
                transforms = method.transforms(self._scale(name), dropout=dropout)
        magnitude = None if method.magnitude is None else method.magnitude.float()
        return transforms, magnitude

    # ---- the forward pass --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._pending()
        if not names:
            return self.base_layer(x)
        if not torch.is_grad_enabled():
            return F.linear(x, self._inference_weight(names), self.base_layer.bias)
        return self._forward_on_activations(x, names)

    def _forward_on_activations(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        built = [self._transforms(n, dropout=self.training) for n in names]
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if len(built) == 1 and built[0][1] is None:  # one adapter, no magnitude: its transform may fuse both sides
            transforms = built[0][0]
            first = next(iter(transforms.values()))
            y = first.fused_linear(x, weight, bias, transforms.get("input"), transforms.get("output"))
            if y is not None:
                return y
        # Input sides: x R_in,K ... R_in,1 W^T (the last adapter acts first on the input); the one next
        # to W goes through linear_after, which low-rank transforms fuse with the frozen linear.
        inputs = [t["input"] for t, _ in reversed(built) if "input" in t]
        for transform in inputs[:-1]:
            x = transform.right_mul(x)
        needs_post = any("output" in t or s is not None for t, s in built)
        if inputs:
            y = inputs[-1].linear_after(x, weight, None if needs_post else bias)
        else:
            y = F.linear(x, weight, None if needs_post else bias)
        if needs_post:
            for transforms, magnitude in built:
                if "output" in transforms:
                    y = transforms["output"].right_mul(y, transpose=True)  # y R_out^T
                if magnitude is not None:
                    y = y * magnitude.to(y.dtype)
            if bias is not None:
                y = y + bias
        return y

    def adapted_weight(self, names: list[str] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective weight with the given (default: pending) adapters applied."""
        names = self._pending() if names is None else names
        weight = self.base_layer.weight
        out = weight.to(dtype or torch.float32)
        for name in names:
            transforms, magnitude = self._transforms(name)
            out = _apply_to_weight(out, transforms, magnitude)
        return out

    def _cache_key(self, names: list[str]) -> tuple:
        params = [p for n in names for p in self.ortho_adapters[n].parameters()]
        w = self.base_layer.weight
        return (
            tuple(names),
            tuple(self._scale(n) for n in names),
            tuple((id(p), p._version) for p in params),
            (id(w), w._version, w.dtype, w.device),
        )

    def _inference_weight(self, names: list[str]) -> torch.Tensor:
        key = self._cache_key(names)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        weight = self.adapted_weight(names).to(self.base_layer.weight.dtype)
        if self.call_scale is None and not self.training:
            self._cache = (key, weight)  # eval: kept until a parameter, scale or weight changes
        return weight

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True) -> OrthoLinear:
        self._cache = None
        return super().train(mode)

    # ---- merging -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold the pending adapters into the base weight (computed in float64).

        The first merge keeps a copy of the base weight (``unmerged_weight``, a non-persistent buffer in
        the weight's dtype and device: one more weight of this layer while merged), so ``unmerge`` gives
        the original weight back bit for bit, whatever the adapter's parameters (inverting a transform
        that can be near singular, as ETHER+'s, could not)."""
        names = self._pending()
        if not names:
            return
        weight = self.base_layer.weight
        if not self.merged_adapters:
            self.register_buffer("unmerged_weight", weight.detach().clone(), persistent=False)
        merged = weight.double()
        for name in names:
            transforms, magnitude = self._transforms(name)
            merged = _apply_to_weight(merged, transforms, magnitude)
        weight.copy_(merged.to(weight.dtype))
        self.merged_adapters.extend(names)
        self._cache = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly (from the copy ``merge`` kept) and free the copy."""
        if not self.merged_adapters:
            return
        saved = self._buffers.pop("unmerged_weight", None)
        if saved is None:
            raise RuntimeError(
                "this layer is marked merged but holds no copy of its base weight; reload the base model "
                "instead of unmerging"
            )
        weight = self.base_layer.weight
        weight.copy_(saved.to(device=weight.device, dtype=weight.dtype))
        self.merged_adapters = []
        self._cache = None

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}, enabled={self.adapters_enabled}"


def method_device(method: nn.Module) -> torch.device:
    for p in method.parameters():
        return p.device
    return torch.device("cpu")
