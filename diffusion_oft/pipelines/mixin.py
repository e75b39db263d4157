"""OrthoAdapterMixin: orthogonal adapters as first-class pipeline arguments.

Mixed in before a diffusers pipeline class (``class P(OrthoAdapterMixin, StableDiffusionPipeline)``)
it adds

* ``adapter=`` / ``adapter_scale=`` to ``__init__`` (hence to ``from_pretrained`` and
  ``from_pipe``): adapter files loaded once, active for every call;
* ``adapter=`` / ``adapter_scale=`` to ``__call__``: adapters (loaded names or files, loaded on
  first use and kept) and scales for this call only;
* ``load_ortho_adapter``, ``set_ortho_adapters``, ``enable_ortho_adapters``,
  ``disable_ortho_adapters``, ``merge_ortho_adapters``, ``unmerge_ortho_adapters``,
  ``remove_ortho_adapter`` and ``ortho_adapters`` (names chosen not to shadow diffusers' LoRA
  methods such as ``set_adapters`` / ``fuse_lora``, which keep working).

All logic lives in :mod:`diffusion_oft.inference`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .. import inference

AdapterArg = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike] | None
ScaleArg = float | Sequence[float] | None


class OrthoAdapterMixin:
    """Adapter methods and ``adapter=`` / ``adapter_scale=`` keywords for a diffusers pipeline."""

    def _init_ortho_adapters(self, adapter: AdapterArg, adapter_scale: ScaleArg) -> None:
        if adapter is not None:
            self.load_ortho_adapter(adapter, scale=adapter_scale)
        elif adapter_scale is not None:
            raise ValueError("adapter_scale was given without adapter")

    def load_ortho_adapter(
        self, adapter: AdapterArg, adapter_name: str | Sequence[str] | None = None, scale: ScaleArg = None
    ) -> list[str]:
        """Load one or several adapter files (a path, a list of paths or {name: path}) and make
        exactly them active, composed in order, with ``scale`` (one value or one per file).
        Names default to the file names.  Returns the names."""
        if isinstance(adapter, Mapping):
            names, paths = list(adapter), list(adapter.values())
        else:
            paths = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
            names = (
                None if adapter_name is None else ([adapter_name] if isinstance(adapter_name, str) else adapter_name)
            )
        return inference.load_adapters(self, paths, names=names, weights=scale)

    def set_ortho_adapters(self, names: Sequence[str] | str, weights: ScaleArg = None) -> None:
        """Choose the active adapters (composed in order) and their scales."""
        inference.set_adapters(self, names, weights)

    def enable_ortho_adapters(self) -> None:
        inference.set_adapter_enabled(self, True)

    def disable_ortho_adapters(self) -> None:
        inference.set_adapter_enabled(self, False)

    def merge_ortho_adapters(self) -> None:
        """Fold the active adapters into the weights (base-model speed; per-call switching is off)."""
        inference.merge_adapter(self)

    def unmerge_ortho_adapters(self) -> None:
        inference.unmerge_adapter(self)

    def remove_ortho_adapter(self, adapter_name: str | None = None) -> None:
        inference.remove_adapter(self, adapter_name)

    @property
    def ortho_adapters(self) -> dict[str, float]:
        """{name: scale} of the active adapters, in composition order."""
        return inference.active_adapters(self)

    def _call_with_ortho_adapters(self, call: Any, adapter: AdapterArg, adapter_scale: ScaleArg, *args, **kwargs):
        if adapter is None and adapter_scale is None:
            return call(*args, **kwargs)
        if isinstance(adapter, Mapping):
            raise ValueError("__call__ takes adapter names or files for adapter=, not a mapping")
        with inference.use_adapters(self, adapter, adapter_scale):
            return call(*args, **kwargs)
