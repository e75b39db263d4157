"""Build the transforms of all layers of one adapter in one batched call per training step.

A training forward needs every adapted layer's transform (Cayley rotations, Householder bases):
built layer by layer that is ~15 small tensor ops per layer, each paying a fixed dispatch and
launch cost (hundreds per step on a UNet).  All methods' transforms are block-diagonal, so the
block parameters of many layers concatenated along their block axis (-2) build the direct sum of
their transforms in the same ops; ``BlockTransform.split`` hands each layer its part (views).

``TransformBatch`` does this for the layers of one adapter whose parameters have the same block
shape (``add_adapter`` groups them).  The first layer that asks in a forward builds the whole
group; the others reuse it.  The build is kept while it is valid:
  * the asking layer's parameters unchanged (storage and in-place version: an optimizer step
    invalidates it; a layer's part depends on its own parameters only), same scale and dropout flag;
  * not yet backpropagated through: a hook on the built tensors marks it *consumed* when its
    gradient is computed, so the next forward (gradient accumulation, a second loss, reentrant
    gradient checkpointing) builds afresh instead of reusing a freed graph.  Non-reentrant
    checkpointing recomputes layers before that hook fires and so gets the very same transforms
    (including the same dropout mask).
It is used only with gradients enabled, outside torch.compile (which traces the per-layer build),
when every member trains, and all members are on one device; otherwise layers build their own.
"""

from __future__ import annotations

import torch

from .methods.base import OrthoMethod
from .methods.transforms import BlockTransform


class TransformBatch:
    """The layers (method modules) of one adapter whose transforms are built together."""

    def __init__(self, members: list[OrthoMethod]):
        self.members = list(members)
        self._index = {id(m): i for i, m in enumerate(self.members)}
        self._member_keys: list[tuple] = []
        self._settings: tuple | None = None
        self._built: list[dict[str, BlockTransform]] | None = None
        self._consumed = True

    def __getstate__(self) -> dict:
        # Copies and pickles (copy.deepcopy(model), torch.save(model)) carry the members, not a build
        # (its tensors belong to the original's autograd graph); member ids are re-read after a copy.
        return {"members": self.members}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"])

    @staticmethod
    def group_key(method: OrthoMethod) -> tuple:
        """Methods with equal keys can be built together (same class, config and block shapes)."""
        shapes = tuple((name, p.shape[:-2] + p.shape[-1:]) for name, p in method.block_parameters().items())
        return (type(method), method.config.to_json(), shapes)

    def _params(self) -> list[torch.Tensor]:
        return [p for m in self.members for p in m.block_parameters().values()]

    def _buildable(self) -> bool:
        """Every member trains and all are on one device (checked before each build)."""
        params = self._params()
        device = params[0].device
        return all(p.requires_grad and p.device == device for p in params)

    def transforms_of(self, method: OrthoMethod, scale: float, dropout: bool) -> dict[str, BlockTransform] | None:
        """``method``'s transforms from the group build (built now if needed), or None when the
        group cannot be used for this call (the caller then builds the layer's own)."""
        index = self._index.get(id(method))
        if index is None or len(self.members) < 2 or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        # A layer's part depends only on its own parameters: checking its own key is enough (O(1)).
        if self._consumed or self._settings != (scale, dropout) or self._member_keys[index] != method.own_key():
            if not self._buildable():
                return None
            self._build(scale, dropout)
        return self._built[index]

    def _build(self, scale: float, dropout: bool) -> None:
        first = self.members[0]
        member_keys = [m.own_key() for m in self.members]
        member_params = [m.block_parameters() for m in self.members]
        names = list(member_params[0])
        # Identity saved-tensor hooks hide the build from an enclosing non-reentrant checkpoint: its
        # recomputation reuses this build and must see the same saved tensors as the first forward.
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            params = {name: torch.cat([own[name] for own in member_params], dim=-2) for name in names}
            built = first.build_transforms(params, tuple(member_keys), scale, dropout)
        per_member: list[dict[str, BlockTransform]] = [{} for _ in self.members]
        for side, transform in built.items():
            dims = [type(m).side_dim(side, m.in_features, m.out_features) for m in self.members]
            for own, piece in zip(per_member, transform.split(dims), strict=True):
                own[side] = piece
            for tensor in transform.tensors():
                if tensor.requires_grad:
                    tensor.register_hook(self._mark_consumed)
        self._member_keys, self._settings = member_keys, (scale, dropout)
        self._built, self._consumed = per_member, False

    def _mark_consumed(self, grad: torch.Tensor) -> None:
        self._consumed = True
        self._built = None  # drop the references to the spent graph

    def clear(self) -> None:
        self._member_keys, self._settings, self._built, self._consumed = [], None, None, True


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def group_methods(methods: list[OrthoMethod]) -> None:
    """Give each method a ``transform_batch`` shared with the others of the same group key."""
    groups: dict[tuple, list[OrthoMethod]] = {}
    for method in methods:
        groups.setdefault(TransformBatch.group_key(method), []).append(method)
    for members in groups.values():
        batch = TransformBatch(members)
        for method in members:
            method.transform_batch = batch
