"""One batched transform build per training step (diffusion_oft.batching) gives the same outputs
and gradients as building each layer's own transforms, and stays correct when the forward is run
again (gradient accumulation, optimizer steps, gradient checkpointing)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import METHOD_CONFIGS, make_tiny_unet
from torch.utils.checkpoint import checkpoint

import diffusion_oft as do
from diffusion_oft import batching
from diffusion_oft.layers import OrthoLinear

CONFIGS = {
    **METHOD_CONFIGS,
    "oft_neumann": dict(method="oft", block_size=8, cayley_mode="neumann"),
    "boft_m3": dict(method="boft", block_size=2, n_butterfly_factors=3),
    "ether_plus_b": dict(method="ether_plus", block_size=8),  # one group per side shape
}


def adapted_pair(config: dict, std: float = 0.1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny UNet with a random adapter (batched builds) and a copy whose layers build their own."""
    unet = make_tiny_unet().train()
    do.add_adapter(unet, do.AdapterConfig(**config))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in do.adapter_parameters(unet):
            p.add_(torch.randn_like(p) * std)
    plain = copy.deepcopy(unet)
    for method in plain.modules():
        method.__dict__.pop("transform_batch", None)
    return unet, plain


def count_builds(monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = batching.TransformBatch._build

    def spy(self, *args):
        sizes.append(len(self.members))
        return original(self, *args)

    monkeypatch.setattr(batching.TransformBatch, "_build", spy)
    return sizes


def grads(unet) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in do.adapter_parameters(unet)]


def loss_of(unet, inputs) -> torch.Tensor:
    return unet(*inputs).sample.square().mean()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_build_equals_per_layer_build(name, unet_inputs, monkeypatch):
    unet, plain = adapted_pair(CONFIGS[name])
    builds = count_builds(monkeypatch)
    loss = loss_of(unet, unet_inputs)
    loss.backward()
    n_layers = len([m for m in unet.modules() if isinstance(m, OrthoLinear)])
    assert builds and sum(builds) == n_layers > len(builds)  # every layer from a group build, fewer builds
    expected = loss_of(plain, unet_inputs)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for got, want in zip(grads(unet), grads(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_accumulation_and_optimizer_steps_rebuild(unet_inputs, monkeypatch):
    unet, plain = adapted_pair(CONFIGS["oft"])
    builds = count_builds(monkeypatch)
    for model in (unet, plain):  # two accumulated backward passes, then a step, then one more
        optimizer = torch.optim.SGD(do.adapter_parameters(model), lr=10.0)
        loss_of(model, unet_inputs).backward()
        loss_of(model, unet_inputs).backward()  # the first build's graph is spent: a new build
        optimizer.step()
        optimizer.zero_grad()
        model.last_loss = loss_of(model, unet_inputs)
        model.last_loss.backward()
    assert len(builds) == 3
    torch.testing.assert_close(unet.last_loss, plain.last_loss, rtol=1e-6, atol=0)
    for got, want in zip(grads(unet), grads(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_forward_without_backward_then_step_rebuilds(unet_inputs):
    unet, plain = adapted_pair(CONFIGS["boft"])
    for model in (unet, plain):
        loss_of(model, unet_inputs)  # e.g. a logged validation loss: no backward
        with torch.no_grad():
            for p in do.adapter_parameters(model):
                p.mul_(1.5)  # an in-place update, like an optimizer step
        model.last_loss = loss_of(model, unet_inputs)
    torch.testing.assert_close(unet.last_loss, plain.last_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant, unet_inputs):
    unet, plain = adapted_pair(CONFIGS["ether_plus_b"])
    sample, t, text = unet_inputs
    for model in (unet, plain):
        block = model.down_blocks[0]  # a cross-attention block, checkpointed, then run again plainly
        h = model.conv_in(sample)
        emb = model.time_embedding(model.time_proj(t))
        h = h.requires_grad_(True) if reentrant else h

        def run(x, block=block, emb=emb):
            return block(x, emb, encoder_hidden_states=text)[0]

        out = checkpoint(run, h, use_reentrant=reentrant)
        (out.square().mean() + run(h).mean()).backward()
    for got, want in zip(grads(unet), grads(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_unet_gradient_checkpointing_matches(unet_inputs):
    unet, plain = adapted_pair(CONFIGS["boft"])
    for model in (unet, plain):
        model.enable_gradient_checkpointing()
        loss_of(model, unet_inputs).backward()
    for got, want in zip(grads(unet), grads(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_not_used_without_grad_or_when_frozen(unet_inputs, monkeypatch):
    unet, _ = adapted_pair(CONFIGS["oft"])
    builds = count_builds(monkeypatch)
    with torch.no_grad():
        unet(*unet_inputs)
    do.add_adapter(unet, do.AdapterConfig(**CONFIGS["ether_plus_b"]), adapter_name="second")  # freezes the first
    do.set_adapters(unet, ["default", "second"])
    loss_of(unet, unet_inputs).backward()
    sizes_second = {len(m.transform_batch.members) for m in unet.modules() if type(m).__name__ == "ETHERPlus"}
    assert builds and set(builds) <= sizes_second  # only the trainable adapter is batched


@pytest.mark.parametrize("mode", ["exact", "neumann"])
def test_blocks_outside_the_fast_range_fall_back_alone_and_identically(mode, monkeypatch):
    """A few large blocks (exact: |S|_F > 0.5, the doubling product's range; Neumann: |S|_2 >= 1) take
    the exact solve on their own, whichever batch they are built in; the others agree to float32
    rounding (the doubling product's length follows the largest block of the batch)."""
    from diffusion_oft.methods import boft
    from diffusion_oft.methods.cayley import cayley

    monkeypatch.setattr(boft, "_neumann_warned", False)
    unet, plain = adapted_pair({**CONFIGS["oft"], "cayley_mode": mode}, std=0.01)
    method = next(m for m in unet.modules() if isinstance(m, boft.OFT))
    with torch.no_grad():
        method.skew[1].normal_(std=2.0)  # one large block in one layer
    batch = method.transform_batch
    with torch.enable_grad():
        grouped = batch.transforms_of(method, 1.0, False)["input"].blocks[0]
    own = method.transforms()["input"].blocks[0]
    torch.testing.assert_close(grouped, own, atol=1e-7, rtol=0)
    assert method._neumann_check[1] is False  # (the last plan: one block outside)
    skew = method.skew_matrices()[0]  # (n, b, b)
    expected = torch.stack([cayley(s[None], "exact" if i == 1 else mode)[0] for i, s in enumerate(skew)])
    torch.testing.assert_close(own, expected, atol=2e-6, rtol=0)
    eye = torch.eye(own.shape[-1])
    torch.testing.assert_close(own[1] @ own[1].T, eye, atol=1e-5, rtol=0)  # the large block is orthogonal


def test_model_copies_mid_step_and_keep_batching(unet_inputs, monkeypatch):
    unet, _ = adapted_pair(CONFIGS["oft"])
    loss_of(unet, unet_inputs)  # a build is held (no backward yet)
    twin = copy.deepcopy(unet)  # e.g. an EMA copy: must not try to copy the build's graph
    builds = count_builds(monkeypatch)
    loss_of(twin, unet_inputs).backward()
    assert len(builds) == 1  # the copy batches its own layers
    expected = loss_of(unet, unet_inputs)
    torch.testing.assert_close(loss_of(twin, unet_inputs), expected, rtol=1e-6, atol=0)
