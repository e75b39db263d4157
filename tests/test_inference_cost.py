"""Inference cost: a merged adapter, and an unmerged one in eval (its transformed weight cached), run
exactly the base UNet's kernels: the same aten operations, in the same order, with the same shapes.
(The benchmark's timings of the same claim are in benchmarks/speed.py; on a shared CPU they are
noisier than the few per cent at stake, this is not.)"""

from __future__ import annotations

import pytest
import torch
from conftest import METHOD_CONFIGS, random_adapter
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion_oft as do


class RecordOps(TorchDispatchMode):
    """Records (aten op, input shapes) of everything dispatched."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def recorded_forward(unet, inputs) -> list[tuple[str, tuple]]:
    with torch.no_grad(), RecordOps() as recorder:
        unet(*inputs)
    return recorder.ops


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_cached_and_merged_inference_run_the_base_kernels(unet_inputs, method):
    from conftest import make_tiny_unet

    base_ops = recorded_forward(make_tiny_unet(), unet_inputs)
    unet = random_adapter(METHOD_CONFIGS[method]).eval()
    first = recorded_forward(unet, unet_inputs)  # builds the transformed weights
    assert len(first) > len(base_ops)  # (the check below would notice a recomputation)
    assert recorded_forward(unet, unet_inputs) == base_ops  # cached: nothing recomputed per call
    do.merge_adapter(unet)
    assert recorded_forward(unet, unet_inputs) == base_ops
    do.unmerge_adapter(unet)
    # unmerging dropped the cache: rebuilt once (without the host-side |S| bound, cached per change)
    assert len(recorded_forward(unet, unet_inputs)) > len(base_ops)
    assert recorded_forward(unet, unet_inputs) == base_ops
