"""Adapters on a tiny diffusers UNet: identity at init, merging, gradients, training, robustness."""

from __future__ import annotations

import pytest
import torch
from conftest import METHOD_CONFIGS, make_tiny_unet, run_unet
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import diffusion_oft as do
from diffusion_oft.layers import OrthoLinear
from diffusion_oft.methods import get_method_class

ALL = list(METHOD_CONFIGS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize(unet, std: float = 0.3) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in do.adapter_parameters(unet):
            p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("method", ["oft", "boft", "ether_plus", "hra"])
@pytest.mark.parametrize("grad", [False, True])
def test_exact_identity_at_init(tiny_unet, unet_inputs, method, grad):
    base = run_unet(tiny_unet, unet_inputs)
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS[method]))
    assert torch.equal(run_unet(tiny_unet, unet_inputs, grad=grad), base)


def test_ether_starts_as_a_reflection_and_changes_the_output(tiny_unet, unet_inputs):
    base = run_unet(tiny_unet, unet_inputs)
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS["ether"]))
    assert rel_err(run_unet(tiny_unet, unet_inputs), base) > 1e-2


@pytest.mark.parametrize("method", ALL)
def test_activation_and_weight_paths_agree(tiny_unet, unet_inputs, method):
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS[method]))
    randomize(tiny_unet)
    on_weights = run_unet(tiny_unet, unet_inputs, grad=False)  # cached transformed weights
    on_activations = run_unet(tiny_unet, unet_inputs, grad=True).detach()
    assert rel_err(on_activations, on_weights) < 1e-5


@pytest.mark.parametrize("method", ALL)
def test_merge_matches_unmerged_and_unmerge_does_not_drift(tiny_unet, unet_inputs, method):
    base = run_unet(tiny_unet, unet_inputs)
    weights = {k: v.clone() for k, v in tiny_unet.state_dict().items() if "base_layer.weight" not in k}
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS[method]))
    # ETHER+ is not orthogonal: its condition number grows as u and v turn orthogonal, so it is
    # moved less far from its (identity) init than the orthogonal methods.
    randomize(tiny_unet, std=0.05 if method == "ether_plus" else 0.3)
    unmerged = run_unet(tiny_unet, unet_inputs)
    assert rel_err(unmerged, base) > 1e-3  # the adapter does something
    do.merge_adapter(tiny_unet)
    assert rel_err(run_unet(tiny_unet, unet_inputs), unmerged) <= 1e-4
    do.unmerge_adapter(tiny_unet)
    original = {n: layer.base_layer.weight.detach().clone() for n, layer in do.model.named_ortho_layers(tiny_unet)}
    for _ in range(100):
        do.merge_adapter(tiny_unet)
        do.unmerge_adapter(tiny_unet)
    for name, layer in do.model.named_ortho_layers(tiny_unet):
        w0 = original[name]
        assert rel_err(layer.base_layer.weight.detach(), w0) <= 1e-5, name
    do.remove_adapter(tiny_unet)
    assert not any(isinstance(m, OrthoLinear) for m in tiny_unet.modules())
    for k, v in tiny_unet.state_dict().items():
        if k in weights:
            assert torch.allclose(v, weights[k], rtol=1e-5, atol=1e-6), k
    assert rel_err(run_unet(tiny_unet, unet_inputs), base) < 1e-5


# Parameters moved as far as training moves them, and farther: ETHER+'s u and v can end up nearly
# orthogonal (a near-singular transform), which no inverse could undo exactly.
UNMERGE_SCALES = (0.01, 0.3, 1.0, 3.0)


# The default run checks the input side without magnitude for every method; the other three combinations
# run with the slow tests (CI).
@pytest.mark.parametrize("magnitude", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "magnitude"])
@pytest.mark.parametrize("side", ["input", pytest.param("output", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ALL)
def test_unmerge_and_remove_give_back_the_base_weights_exactly(unet_inputs, method, side, magnitude):
    """merge -> 20 x (unmerge, merge) -> unmerge -> remove: the base weights bit for bit, in fp32, fp16 and
    bf16, for parameters at every scale (issue: ETHER+ used to come back up to 1.0 off)."""
    reference = make_tiny_unet()
    base_out = run_unet(reference, unet_inputs)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base_state = {k: v.to(dtype) for k, v in reference.state_dict().items()}
        for scale in UNMERGE_SCALES if dtype == torch.float32 else UNMERGE_SCALES[-2:]:
            unet = make_tiny_unet().to(dtype)
            do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS[method], side=side, magnitude=magnitude))
            torch.manual_seed(int(scale * 100))
            with torch.no_grad():
                for p in do.adapter_parameters(unet):
                    p.add_(torch.randn_like(p) * scale)
            originals = {n: layer.base_layer.weight.detach().clone() for n, layer in do.model.named_ortho_layers(unet)}
            do.merge_adapter(unet)
            moved = max(
                rel_err(layer.base_layer.weight.float(), originals[n].float())
                for n, layer in do.model.named_ortho_layers(unet)
            )
            assert moved > 1e-3, "the merge changed nothing: the test would prove nothing"
            for _ in range(20 if scale == UNMERGE_SCALES[-1] else 3):
                do.unmerge_adapter(unet)
                do.merge_adapter(unet)
            do.unmerge_adapter(unet)
            for name, layer in do.model.named_ortho_layers(unet):
                assert torch.equal(layer.base_layer.weight, originals[name]), (dtype, scale, name)
                assert "unmerged_weight" not in layer._buffers  # the copy is freed after unmerging
            do.merge_adapter(unet)
            do.remove_adapter(unet)  # removing a merged adapter unmerges it first
            state = unet.state_dict()
            assert state.keys() == base_state.keys()
            for key, value in base_state.items():
                assert torch.equal(state[key], value), (dtype, scale, key)
            if dtype == torch.float32:
                assert torch.equal(run_unet(unet, unet_inputs), base_out)


def test_merged_state_dict_holds_no_copy_of_the_base_weights(tiny_unet):
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS["oft"]))
    keys = set(tiny_unet.state_dict())
    do.merge_adapter(tiny_unet)
    assert set(tiny_unet.state_dict()) == keys  # the kept copy is a non-persistent buffer


def test_enable_disable_and_remove_restore_base(tiny_unet, unet_inputs):
    base = run_unet(tiny_unet, unet_inputs)
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS["oft"]))
    randomize(tiny_unet)
    adapted = run_unet(tiny_unet, unet_inputs)
    do.set_adapter_enabled(tiny_unet, False)
    assert torch.equal(run_unet(tiny_unet, unet_inputs), base)
    do.set_adapter_enabled(tiny_unet, True)
    assert torch.equal(run_unet(tiny_unet, unet_inputs), adapted)
    do.remove_adapter(tiny_unet)
    assert torch.equal(run_unet(tiny_unet, unet_inputs), base)
    assert all(type(p) is AttnProcessor2_0 for p in tiny_unet.attn_processors.values())


@pytest.mark.parametrize("method", ALL)
def test_gradients_reach_only_adapter_parameters(tiny_unet, unet_inputs, method):
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS[method]))
    randomize(tiny_unet, std=0.05)
    run_unet(tiny_unet, unet_inputs, grad=True).pow(2).mean().backward()
    adapter_ids = {id(p) for p in do.adapter_parameters(tiny_unet)}
    for name, p in tiny_unet.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("method", ALL)
def test_fifty_steps_lower_the_loss(unet_inputs, method):
    unet = make_tiny_unet().train()
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS[method], coft_eps=None))
    lr = {"oft": 3e-2, "boft": 3e-2, "ether": 3e-2, "ether_plus": 3e-2, "hra": 3e-2}[method]
    opt = torch.optim.Adam(do.adapter_parameters(unet), lr=lr)
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(unet(*unet_inputs).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        do.apply_constraints(unet)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], (losses[0], losses[-1])


def test_coft_keeps_blocks_inside_the_radius(unet_inputs):
    unet = make_tiny_unet().train()
    do.add_adapter(unet, do.AdapterConfig(method="oft", block_size=8, coft_eps=1e-3))
    opt = torch.optim.SGD(do.adapter_parameters(unet), lr=10.0)
    for _ in range(3):
        unet(*unet_inputs).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        do.apply_constraints(unet)
    for p in do.adapter_parameters(unet):
        assert (p.detach().norm(dim=-1) * 2**0.5).max() <= 1e-3 * (1 + 1e-5)


def test_trainable_parameter_count_equals_formula(tiny_unet):
    for method, kwargs in METHOD_CONFIGS.items():
        config = do.AdapterConfig(**kwargs)
        targets = do.find_targets(tiny_unet, config)
        cls = get_method_class(method)
        expected = sum(cls.num_parameters(t.in_features, t.out_features, config) for t in targets)
        do.add_adapter(tiny_unet, config, adapter_name=method)
        assert do.count_adapter_parameters(tiny_unet, method) == expected
        trainable = sum(p.numel() for p in tiny_unet.parameters() if p.requires_grad)
        assert trainable == expected
    # 4 transformer blocks (down 1, mid 1, up 2) x (attn1 + attn2) x 4 projections
    assert len(targets) == 32


def test_attention_selection_and_extra_targets(tiny_unet):
    cross = do.find_targets(tiny_unet, do.AdapterConfig(attention="cross"))
    assert {t.attention_kind for t in cross} == {"cross"} and all(".attn2." in t.path for t in cross)
    selfs = do.find_targets(tiny_unet, do.AdapterConfig(attention="self"))
    assert all(".attn1." in t.path for t in selfs)
    ff = do.find_targets(tiny_unet, do.AdapterConfig(extra_target_modules=("ff.net.0.proj", "ff.net.2")))
    assert sum(t.attention_kind is None for t in ff) == 8  # 4 blocks x 2 feed-forward linears


def test_bad_config_fails_before_touching_the_model(tiny_unet, unet_inputs):
    base = run_unet(tiny_unet, unet_inputs)
    with pytest.raises(ValueError, match=r"cannot put oft on .*block sizes that work for 32"):
        do.add_adapter(tiny_unet, do.AdapterConfig(method="oft", block_size=5))
    with pytest.raises(ValueError, match="no module of UNet2DConditionModel matches"):
        do.add_adapter(tiny_unet, do.AdapterConfig(target_modules=("nope",)))
    assert not any(isinstance(m, OrthoLinear) for m in tiny_unet.modules())
    assert all(p.requires_grad for p in tiny_unet.parameters())
    assert torch.equal(run_unet(tiny_unet, unet_inputs), base)


# ---- robustness to what users do to pipelines ---------------------------------------------------------


@pytest.fixture
def adapted(tiny_unet, unet_inputs):
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS["boft"]))
    randomize(tiny_unet)
    return tiny_unet, run_unet(tiny_unet, unet_inputs)


def test_adapters_survive_attention_slicing(adapted, unet_inputs):
    unet, expected = adapted
    unet.set_attention_slice(1)
    assert rel_err(run_unet(unet, unet_inputs), expected) < 1e-5


def test_adapters_survive_set_attn_processor(adapted, unet_inputs):
    unet, expected = adapted
    unet.set_attn_processor(AttnProcessor())
    assert rel_err(run_unet(unet, unet_inputs), expected) < 1e-5
    unet.set_default_attn_processor()
    assert rel_err(run_unet(unet, unet_inputs), expected) < 1e-5


def test_xformers_request_fails_loudly_or_keeps_adapters(adapted, unet_inputs):
    unet, expected = adapted
    try:
        unet.enable_xformers_memory_efficient_attention()
    except (ModuleNotFoundError, ValueError):
        pass  # no xformers / no CUDA here: a loud error, nothing changed
    assert rel_err(run_unet(unet, unet_inputs), expected) < 1e-5


def test_fuse_qkv_refuses_unmerged_adapters_and_works_after_merge(adapted, unet_inputs):
    unet, expected = adapted
    with pytest.raises(RuntimeError, match="merge_adapter"):
        unet.fuse_qkv_projections()
    assert rel_err(run_unet(unet, unet_inputs), expected) < 1e-5
    do.merge_adapter(unet)
    unet.fuse_qkv_projections()
    assert rel_err(run_unet(unet, unet_inputs), expected) < 1e-4
    with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
        do.unmerge_adapter(unet)


def test_ortho_scale_per_call_and_no_warning_spam(adapted, unet_inputs, caplog):
    unet, expected = adapted
    base_like = run_unet(unet, unet_inputs, cross_attention_kwargs={"ortho_scale": 0.0})
    do.set_adapter_enabled(unet, False)
    base = run_unet(unet, unet_inputs)
    do.set_adapter_enabled(unet, True)
    assert rel_err(base_like, base) < 1e-6
    assert rel_err(run_unet(unet, unet_inputs, cross_attention_kwargs={"ortho_scale": 1.0}), expected) < 1e-6
    assert "not expected" not in caplog.text


def test_gradient_checkpointing_and_state_dict(unet_inputs):
    unet = make_tiny_unet().train()
    do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS["oft"]))
    unet.enable_gradient_checkpointing()
    unet(*unet_inputs).sample.mean().backward()
    assert all(p.grad is not None for p in do.adapter_parameters(unet))
    assert any(k.endswith("ortho_adapters.default.skew") for k in unet.state_dict())


def test_two_adapters_compose_and_stay_orthogonal(tiny_unet, unet_inputs):
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS["oft"]), adapter_name="subject")
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS["boft"]), adapter_name="style")
    randomize(tiny_unet)
    layer = next(iter(do.model.ortho_layers(tiny_unet)))
    w = layer.base_layer.weight.detach().double()
    composed = layer.adapted_weight(dtype=torch.float64)
    gram = lambda m: m @ m.T  # rows' inner products are kept by right-orthogonal maps
    torch.testing.assert_close(gram(composed), gram(w), atol=1e-5, rtol=1e-5)
    do.set_adapters(tiny_unet, ["subject"])
    only_subject = run_unet(tiny_unet, unet_inputs)
    do.set_adapters(tiny_unet, ["subject", "style"], [1.0, 0.0])
    assert rel_err(run_unet(tiny_unet, unet_inputs), only_subject) < 1e-6


def test_other_diffusers_models():
    from diffusers import ControlNetModel, SD3Transformer2DModel

    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
        conditioning_embedding_out_channels=(16, 32),
    ).eval()
    do.add_adapter(controlnet, do.AdapterConfig(method="oft", block_size=8))
    assert len(do.model.ortho_layers(controlnet)) == 16  # (down 1 + mid 1) x 2 attentions x 4

    dit = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8),
        encoder_hidden_states=torch.randn(1, 5, 16),
        pooled_projections=torch.randn(1, 16),
        timestep=torch.tensor([3]),
    )
    with torch.no_grad():
        base = dit(**inputs).sample
    do.add_adapter(dit, do.AdapterConfig(method="ether_plus", num_blocks=2))
    with torch.no_grad():
        assert torch.equal(dit(**inputs).sample, base)
    assert len(do.model.ortho_layers(dit)) == 4


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("method", ALL)
def test_no_graph_breaks_inside_adapted_attention(tiny_unet, method):
    do.add_adapter(tiny_unet, do.AdapterConfig(**METHOD_CONFIGS[method]))
    attn = tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    hidden, text = torch.randn(2, 64, 32), torch.randn(2, 7, 32)
    for grad in (True, False):  # training path (activations) and inference path (cached weight)
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(attn)(hidden, encoder_hidden_states=text)
        assert explained.graph_break_count == 0, explained.break_reasons
