"""kohya / LyCORIS OFT and BOFT files both ways, checked against LyCORIS's own modules
(lycoris-lora is a dev dependency), plus the exact kohya key names for SD 1.5's UNet."""

from __future__ import annotations

import hashlib
import logging
import warnings

import pytest
import torch
from conftest import make_tiny_unet, random_adapter, run_unet
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

import diffusion_oft as do
from diffusion_oft.convert import ConversionError, ConversionWarning, convert, kohya_key_names, read_adapter
from diffusion_oft.convert.kohya import guess_module_path

lycoris = pytest.importorskip("lycoris")
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights  # noqa: E402
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402

TOL = 1e-5
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def differences(out, ref, base):
    err = (out - ref).abs().max().item()
    return err, err / (ref - base).abs().max().item()


@pytest.fixture
def lycoris_kohya_loader():
    """LyCORIS's kohya loader; its default UNet presets list time_embedding.linear_1 twice for a diffusers
    UNet (an assertion error), so restrict the presets while it builds its (then replaced) module list."""
    saved = (LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME)
    LycorisNetworkKohya.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    yield create_network_from_weights
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE, LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = saved


# num_blocks=8 gives every layer of the tiny UNet (widths 32, 64) the same full butterfly depth
# log2(8) + 1 = 4, which is what LyCORIS's loader builds for a BOFT layer.
LOADER_CASES = {
    "oft": dict(method="oft", block_size=4, side="output"),
    "oft_rescale": dict(method="oft", num_blocks=8, side="output", magnitude=True),
    "boft_full_depth": dict(method="boft", num_blocks=8, n_butterfly_factors=4, side="output"),
    "boft_full_depth_rescale": dict(method="boft", num_blocks=8, n_butterfly_factors=4, side="output", magnitude=True),
}


@pytest.mark.parametrize("case", list(LOADER_CASES))
def test_export_runs_identically_in_lycoris(tmp_path, unet_inputs, lycoris_kohya_loader, case):
    unet = random_adapter(LOADER_CASES[case])
    ref = run_unet(unet, unet_inputs)
    do.save_adapter(unet, tmp_path / "ours.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)  # the 'rescale' note for ComfyUI / A1111
        convert(tmp_path / "ours.safetensors", "kohya", tmp_path / "kohya.safetensors")
    base = make_tiny_unet()
    base_out = run_unet(base, unet_inputs)
    network, _ = lycoris_kohya_loader(1.0, str(tmp_path / "kohya.safetensors"), None, None, base, for_inference=True)
    assert len(network.unet_loras) == 32
    expected = ButterflyOFTModule if case.startswith("boft") else DiagOFTModule
    assert all(type(m) is expected for m in network.unet_loras)
    for module in network.unet_loras:
        module.apply_to()
    out = run_unet(base, unet_inputs)
    err, rel = differences(out, ref, base_out)
    print(f"\nours -> LyCORIS {case}: max abs diff {err:.2e}, relative to the adapter's change {rel:.2e}")
    assert err <= TOL
    # back into ours: the same parameters bit for bit
    fresh = make_tiny_unet()
    do.load_adapter(fresh, tmp_path / "kohya.safetensors")
    assert torch.equal(run_unet(fresh, unet_inputs), ref)
    config = do.model.adapter_configs(fresh)["default"]
    assert (config.method, config.side, config.magnitude) == (
        unet.ortho_adapter_configs["default"].method,
        "output",
        "rescale" in case,
    )


def test_partial_butterfly_depth_matches_lycoris_math(tmp_path, unet_inputs):
    """m = 2 < full depth: LyCORIS's loader cannot build it (it fixes m = log2(n) + 1), ComfyUI reads any m;
    check with LyCORIS's BOFT module given the exported blocks directly."""
    unet = random_adapter(dict(method="boft", block_size=4, n_butterfly_factors=2, side="output"))
    ref = run_unet(unet, unet_inputs)
    do.save_adapter(unet, tmp_path / "ours.safetensors")
    convert(tmp_path / "ours.safetensors", "kohya", tmp_path / "kohya.safetensors")
    state = load_file(tmp_path / "kohya.safetensors")
    base = make_tiny_unet()
    base_out = run_unet(base, unet_inputs)
    for path, _ in do.model.named_ortho_layers(unet):
        name = "lora_unet_" + path.replace(".", "_")
        module = ButterflyOFTModule(
            name, base.get_submodule(path), 1.0, lora_dim=4, constraint=float(state[f"{name}.alpha"])
        )
        module.oft_blocks = torch.nn.Parameter(state[f"{name}.oft_blocks"])
        assert module.oft_blocks.shape[0] == 2
        module.apply_to()
    err, rel = differences(run_unet(base, unet_inputs), ref, base_out)
    print(f"\nours -> LyCORIS boft m=2: max abs diff {err:.2e}, relative {rel:.2e}")
    assert err <= TOL


def _lycoris_made(base: torch.nn.Module, boft: bool, alpha: float, rescaled: bool, depth: int | None = None):
    """A LyCORIS-made adapter (its own modules, random blocks as after training) on the attention projections."""
    torch.manual_seed(11)
    state, modules = {}, []
    for path, sub in base.named_modules():
        if not path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            continue
        name = "lora_unet_" + path.replace(".", "_")
        cls = ButterflyOFTModule if boft else DiagOFTModule
        dim = 4 if sub.out_features == 32 else 8  # 8 blocks everywhere: the same BOFT depth for all layers
        module = cls(name, sub, 1.0, lora_dim=dim, constraint=alpha, rescaled=rescaled)
        with torch.no_grad():
            if depth is not None:
                module.oft_blocks = torch.nn.Parameter(torch.zeros(depth, *module.oft_blocks.shape[1:]))
            module.oft_blocks.normal_(0, 0.1)
            if rescaled:
                module.rescale.copy_(1 + 0.1 * torch.randn_like(module.rescale))
        modules.append(module)
        state.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    for module in modules:
        module.apply_to()
    return state


LYCORIS_MADE = {
    "oft": dict(boft=False, alpha=0.0, rescaled=False),
    "oft_constrained_rescaled": dict(boft=False, alpha=0.03, rescaled=True),
    "boft": dict(boft=True, alpha=0.0, rescaled=False),
    "boft_constrained_rescaled": dict(boft=True, alpha=0.05, rescaled=True),
    "boft_depth_2": dict(boft=True, alpha=0.0, rescaled=False, depth=2),
}


@pytest.mark.parametrize("case", list(LYCORIS_MADE))
def test_lycoris_made_file_loads_and_runs_identically(tmp_path, unet_inputs, case):
    base_out = run_unet(make_tiny_unet(), unet_inputs)
    lyco = make_tiny_unet()
    state = _lycoris_made(lyco, **LYCORIS_MADE[case])
    ref = run_unet(lyco, unet_inputs)
    save_file(state, str(tmp_path / "lycoris.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    ours = make_tiny_unet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        do.load_adapter(ours, tmp_path / "lycoris.safetensors")
    notes = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    # a binding alpha means something else to ComfyUI (radius alpha) than to LyCORIS (alpha * out_dim)
    assert len(notes) == (1 if LYCORIS_MADE[case]["alpha"] else 0) and all("ComfyUI" in n for n in notes)
    err, rel = differences(run_unet(ours, unet_inputs), ref, base_out)
    print(f"\nLyCORIS {case} -> ours: max abs diff {err:.2e}, relative to the adapter's change {rel:.2e}")
    assert err <= TOL
    # converting without the model (names mapped from diffusers' vocabulary) gives the same adapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        native = read_adapter(tmp_path / "lycoris.safetensors")
        with_model = read_adapter(tmp_path / "lycoris.safetensors", make_tiny_unet())
    assert native.tensors.keys() == with_model.tensors.keys()
    assert all(torch.equal(native.tensors[k], with_model.tensors[k]) for k in native.tensors)


def test_kohya_peft_style_oftv2_file_loads(tmp_path, unet_inputs):
    """kohya's newer OFTv2 network saves PEFT's oft_R.weight under kohya names (PEFT math, 5 Neumann terms)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    model = peft.get_peft_model(
        make_tiny_unet(), peft.OFTConfig(oft_block_size=8, target_modules=["to_q", "to_v"], init_weights=False)
    )
    ref = run_unet(model.base_model.model, unet_inputs)
    state = {}
    for key, value in peft.get_peft_model_state_dict(model).items():
        path = key.removeprefix("base_model.model.").removesuffix(".oft_R.weight")
        state["lora_unet_" + path.replace(".", "_") + ".oft_R.weight"] = value
    save_file(state, str(tmp_path / "kohya_oftv2.safetensors"))
    ours = make_tiny_unet()
    do.load_adapter(ours, tmp_path / "kohya_oftv2.safetensors")
    assert (run_unet(ours, unet_inputs) - ref).abs().max().item() <= TOL
    assert do.model.adapter_configs(ours)["default"].neumann_terms == 3


def test_formats_kohya_cannot_hold_are_refused(tmp_path):
    cases = {
        "input_side": (dict(method="oft", block_size=8), "cannot be rewritten"),
        "ether": (dict(method="ether", num_blocks=2), "no ether; use --to diff"),
        "neumann": (dict(method="oft", block_size=8, side="output", cayley_mode="neumann"), "Cayley-Neumann"),
    }
    for name, (config, message) in cases.items():
        do.save_adapter(random_adapter(config), tmp_path / f"{name}.safetensors")
        with pytest.raises(ConversionError, match=message):
            convert(tmp_path / f"{name}.safetensors", "kohya", tmp_path / f"{name}_kohya.safetensors")
        assert not (tmp_path / f"{name}_kohya.safetensors").exists()


def test_unreadable_kohya_content_is_named(tmp_path):
    cases = {
        "lora": ({"lora_unet_x_to_q.lora_up.weight": torch.zeros(4, 1)}, "LoRA/LoHa/LoKr"),
        "old_lycoris": ({"lora_unet_x_to_q.oft_diag": torch.zeros(4, 2, 2)}, "oft_diag"),
        "unknown": ({"model.diffusion.weight": torch.zeros(2)}, "not a diffusion-oft adapter, nor"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        unet = make_tiny_unet()
        with pytest.raises(do.AdapterFileError, match=message):
            do.load_adapter(unet, tmp_path / f"{name}.safetensors")
        assert not any(isinstance(m, do.OrthoLinear) for m in unet.modules())


# ---- SD 1.5 key names ------------------------------------------------------------------------------

SD15_NAMES_SHA256 = "c7c097b9106e63d95d9f46a5be71a78972cce178e4b45b499849df76e14f01eb"


def sd15_expected_names() -> list[str]:
    """Written out from SD 1.5's layout, independently of the converter."""
    blocks = [f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)]
    blocks += ["mid_block_attentions_0"]
    blocks += [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)]
    return sorted(
        f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}"
        for block in blocks
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0")
    )


def test_sd15_unet_kohya_key_names_are_pinned():
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # SD 1.5's UNet config (the class defaults)
    names = kohya_key_names(unet, do.AdapterConfig(method="oft", block_size=4, side="output"))
    assert len(names) == 128
    assert names == sd15_expected_names()
    assert names[0] == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v" in names
    assert hashlib.sha256("\n".join(names).encode()).hexdigest() == SD15_NAMES_SHA256
    # without a model, the names map back to diffusers module paths
    for name in names:
        path = guess_module_path(name.removeprefix("lora_unet_"))
        assert unet.get_submodule(path).__class__.__name__ == "Linear"
    for name in (
        "down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
        "mid_block_attentions_0_proj_in",
        "up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2",
        "time_embedding_linear_1",
    ):
        unet.get_submodule(guess_module_path(name))
    assert guess_module_path("text_model_encoder_layers_11_self_attn_out_proj") == (
        "text_model.encoder.layers.11.self_attn.out_proj"
    )
    assert guess_module_path("text_model_encoder_layers_0_mlp_fc1") == "text_model.encoder.layers.0.mlp.fc1"
