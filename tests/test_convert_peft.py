"""PEFT OFT / BOFT adapters both ways, checked against PEFT's own modules (peft is a dev dependency).

PEFT sets BOFT's m = 1 when its CUDA extension does not load (always on CPU), so the real-PEFT
checks use m = 1; m > 1 is checked with PEFT's own BOFT code and a CPU stand-in for the kernel.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_tiny_unet, random_adapter, run_unet
from safetensors.torch import load_file

import diffusion_oft as do
from diffusion_oft.convert import ConversionError, ConversionWarning, convert

peft = pytest.importorskip("peft")
from peft import BOFTConfig, HRAConfig, OFTConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5


def differences(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, the same relative to the adapter's own largest change)."""
    err = (out - ref).abs().max().item()
    return err, err / (ref - base).abs().max().item()


def quiet_peft(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "CUDA extension" / "setting m to 1" notes on CPU
        return fn(*args, **kwargs)


EXPORT_CASES = {
    "oft_exact": dict(method="oft", block_size=8, cayley_mode="exact"),
    "oft_neumann": dict(method="oft", block_size=8, cayley_mode="neumann", neumann_terms=3),
    "oft_num_blocks": dict(method="oft", num_blocks=4, cayley_mode="neumann", neumann_terms=6),
    "oft_magnitude": dict(method="oft", block_size=8, magnitude=True),
    "boft_m1_magnitude": dict(method="boft", block_size=4, n_butterfly_factors=1, magnitude=True),
    "hra": dict(method="hra", n_reflections=4),
    "hra_odd": dict(method="hra", n_reflections=3),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_runs_identically_in_peft(tmp_path, unet_inputs, case):
    # Neumann cases stay inside the series' region of convergence (|S|_F < 1), where it means something
    # (outside it diffusion-oft falls back to the exact Cayley transform; PEFT would diverge).
    neumann = EXPORT_CASES[case].get("cayley_mode") == "neumann"
    unet = random_adapter(EXPORT_CASES[case], std=0.04 if neumann else 0.1)
    ref = run_unet(unet, unet_inputs)
    do.save_adapter(unet, tmp_path / "ours.safetensors")
    convert(tmp_path / "ours.safetensors", "peft", tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if EXPORT_CASES[case].get("cayley_mode") == "neumann":
        assert peft_config["use_cayley_neumann"] is True
        assert peft_config["num_cayley_neumann_terms"] == EXPORT_CASES[case]["neumann_terms"] + 2
    base = make_tiny_unet()
    base_out = run_unet(base, unet_inputs)
    model = quiet_peft(PeftModel.from_pretrained, base, str(tmp_path / "peft"))
    out = run_unet(model.base_model.model, unet_inputs)
    err, rel = differences(out, ref, base_out)
    print(f"\nours -> PEFT {case}: max abs diff {err:.2e}, relative to the adapter's change {rel:.2e}")
    assert err <= TOL


def _peft_made(tmp_path, peft_config, seed=5):
    torch.manual_seed(seed)
    model = quiet_peft(get_peft_model, make_tiny_unet(), peft_config)
    with torch.no_grad():  # init_weights=False: random R (and s), as after training
        for name, p in model.named_parameters():
            if "boft_s" in name:
                p.copy_(1 + torch.randn_like(p) * 0.1)
            elif "oft_R" in name:
                p.mul_(0.3)  # keep |S|_F < 1: inside the Neumann series' region of convergence
    model.save_pretrained(str(tmp_path / "peft_made"))
    return model


IMPORT_CASES = {
    "oft_neumann_default": lambda t: OFTConfig(oft_block_size=8, target_modules=t, init_weights=False),
    "oft_exact": lambda t: OFTConfig(oft_block_size=8, target_modules=t, init_weights=False, use_cayley_neumann=False),
    "oft_r": lambda t: OFTConfig(
        r=4, oft_block_size=0, target_modules=t, init_weights=False, num_cayley_neumann_terms=7
    ),
    "oft_coft": lambda t: OFTConfig(oft_block_size=8, target_modules=t, init_weights=False, coft=True, eps=0.3),
    "oft_block_share": lambda t: OFTConfig(oft_block_size=8, target_modules=t, init_weights=False, block_share=True),
    "boft_m1": lambda t: BOFTConfig(boft_block_size=4, target_modules=t, init_weights=False),
    "hra": lambda t: HRAConfig(r=4, target_modules=t, init_weights=False),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_peft_made_adapter_loads_and_runs_identically(tmp_path, unet_inputs, case):
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    model = _peft_made(tmp_path, IMPORT_CASES[case](targets))
    ref = run_unet(model.base_model.model, unet_inputs)
    base_out = run_unet(make_tiny_unet(), unet_inputs)
    ours = make_tiny_unet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        do.load_adapter(ours, tmp_path / "peft_made")  # the PEFT folder, converted on the fly
    notes = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    assert notes == (
        ["peft_made: PEFT's COFT radius depends on each layer's block count; the loaded adapter has no COFT"]
        if case == "oft_coft"
        else []
    )
    out = run_unet(ours, unet_inputs)
    err, rel = differences(out, ref, base_out)
    print(f"\nPEFT {case} -> ours: max abs diff {err:.2e}, relative to the adapter's change {rel:.2e}")
    assert err <= TOL
    config = do.model.adapter_configs(ours)["default"]
    assert config.side == "input" and config.target_modules == ("to_k", "to_out.0", "to_q", "to_v")
    # the weights file alone (its adapter_config.json beside it) loads too
    fresh = make_tiny_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        do.load_adapter(fresh, tmp_path / "peft_made" / "adapter_model.safetensors")
    assert torch.equal(run_unet(fresh, unet_inputs), out)


class _CpuBlockDiag:
    """CPU stand-in for PEFT's fbd_cuda kernel: (m, n, b, b) blocks -> (m, n*b, n*b) block-diagonal."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


def test_boft_with_several_factors_matches_peft_layout(tmp_path, unet_inputs, monkeypatch):
    unet = random_adapter(dict(method="boft", block_size=4, n_butterfly_factors=3, magnitude=True))
    ref = run_unet(unet, unet_inputs)
    do.save_adapter(unet, tmp_path / "ours.safetensors")
    with pytest.warns(ConversionWarning, match="CUDA extension"):
        convert(tmp_path / "ours.safetensors", "peft", tmp_path / "peft")
    assert load_file(tmp_path / "peft" / "adapter_model.safetensors")[
        "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.boft_R"
    ].shape == (3, 8, 4, 4)
    # PEFT's own BOFT code (permutations, Cayley, products), with its CUDA block-diag kernel on CPU
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _CpuBlockDiag())
    base = make_tiny_unet()
    base_out = run_unet(base, unet_inputs)
    model = quiet_peft(PeftModel.from_pretrained, base, str(tmp_path / "peft"))
    out = run_unet(model.base_model.model, unet_inputs)
    err, rel = differences(out, ref, base_out)
    print(f"\nours -> PEFT boft m=3 (CPU kernel stand-in): max abs diff {err:.2e}, relative {rel:.2e}")
    assert err <= TOL
    # and back
    fresh = make_tiny_unet()
    do.load_adapter(fresh, tmp_path / "peft")
    assert (run_unet(fresh, unet_inputs) - ref).abs().max().item() <= TOL


def test_formats_peft_cannot_hold_are_refused(tmp_path):
    cases = {
        "ether": (dict(method="ether", num_blocks=2), "PEFT has no ETHER"),
        "output": (dict(method="oft", block_size=8, side="output"), "input side only"),
        "boft_neumann": (
            dict(method="boft", block_size=4, n_butterfly_factors=2, cayley_mode="neumann"),
            "exact Cayley transform only",
        ),
        "hra_blocks": (dict(method="hra", n_reflections=2, num_blocks=2), "one block per layer"),
    }
    for name, (config, message) in cases.items():
        do.save_adapter(random_adapter(config), tmp_path / f"{name}.safetensors")
        with pytest.raises(ConversionError, match=message):
            convert(tmp_path / f"{name}.safetensors", "peft", tmp_path / name)
        assert not (tmp_path / name).exists()


def test_peft_file_for_another_model_leaves_target_unchanged(tmp_path):
    _peft_made(tmp_path, OFTConfig(oft_block_size=8, target_modules=["to_k"], init_weights=False))
    other = make_tiny_unet(cross_attention_dim=48)  # attn2.to_k has 48 inputs: 6 blocks of 8
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(do.AdapterFileError, match=r"attn2\.to_k"):
        do.load_adapter(other, tmp_path / "peft_made")
    assert not any(isinstance(m, do.OrthoLinear) for m in other.modules())
    assert all(torch.equal(v, snapshot[k]) for k, v in other.state_dict().items())
