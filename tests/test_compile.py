"""torch.compile captures an adapted attention module in one graph (no graph breaks inside our
processors or layers), in training mode, with the same outputs and gradients as eager.

``aot_eager`` runs Dynamo's capture and AOTAutograd's joint forward/backward graph without
Inductor's C++ compilation (minutes on CPU); the compiled step times are in benchmarks/speed.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

import diffusion_oft as do

pytestmark = pytest.mark.slow  # torch.compile

CONFIGS = {
    "oft exact": dict(method="oft", block_size=16),
    "oft neumann": dict(method="oft", block_size=16, cayley_mode="neumann"),
    "boft m=2": dict(method="boft", block_size=4, n_butterfly_factors=2),
    "ether": dict(method="ether"),
    "ether_plus": dict(method="ether_plus"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adapted_attention_compiles_as_one_graph_with_eager_gradients(name):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = attn = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32)
    do.add_adapter(holder, do.AdapterConfig(**CONFIGS[name]))
    trainable = [p for p in attn.parameters() if p.requires_grad]
    with torch.no_grad():  # away from the identity, so that the gradients are not trivial
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    # 80 image tokens > 64 output rows: to_q/to_out rotate the weight; K/V (7 text tokens) the activations.
    x, context = torch.randn(2, 80, 64, requires_grad=True), torch.randn(2, 7, 32)

    eager = attn(x, context)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in trainable] + [x.grad.clone()]
    attn.zero_grad()
    x.grad = None

    explanation = torch._dynamo.explain(attn)(x, context)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    out = compiled(x, context)
    out.square().mean().backward()
    grads = [p.grad for p in trainable] + [x.grad]
    torch._dynamo.reset()

    assert torch.allclose(out, eager, atol=1e-6)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    for g, ref in zip(grads, eager_grads, strict=True):
        assert torch.allclose(g, ref, atol=1e-6)
