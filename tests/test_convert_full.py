"""Exports that carry full weights: ``diff`` (kohya-style full deltas, any method) and ``merged``
(a diffusers folder), pipelines with several components, and the ``diffusion-oft convert`` command."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import METHOD_CONFIGS, make_tiny_unet, run_unet
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

import diffusion_oft as do
from diffusion_oft.cli import main
from diffusion_oft.convert import ConversionWarning, convert, kohya_name
from diffusion_oft.tiny import save_tiny_sd, tiny_sd_pipeline


def randomize(module: torch.nn.Module, seed: int = 3, std: float = 0.2) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in do.adapter_parameters(module):
            p.add_(torch.randn_like(p) * std)


DIFF_CASES = {
    **METHOD_CONFIGS,
    "oft_output_magnitude": dict(method="oft", block_size=8, side="output", magnitude=True),
    "boft_neumann": dict(method="boft", block_size=4, n_butterfly_factors=2, cayley_mode="neumann"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(DIFF_CASES))
def test_diff_export_plus_base_weights_is_the_merged_model_bit_for_bit(tmp_path, case, dtype):
    unet = make_tiny_unet().to(dtype)
    do.add_adapter(unet, do.AdapterConfig(**DIFF_CASES[case]))
    randomize(unet)
    do.save_adapter(unet, tmp_path / "adapter.safetensors")
    base = make_tiny_unet().to(dtype)
    convert(tmp_path / "adapter.safetensors", "diff", tmp_path / "diff.safetensors", model=base)
    assert not any(isinstance(m, do.OrthoLinear) for m in base.modules())  # the base model is left as it was
    diff = load_file(tmp_path / "diff.safetensors")
    do.merge_adapter(unet)
    layers = dict(do.model.named_ortho_layers(unet))
    assert sorted(diff) == sorted(f"{kohya_name('unet', path)}.diff" for path in layers)
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    for path, layer in layers.items():
        delta = diff[f"{kohya_name('unet', path)}.diff"]
        assert delta.dtype == wide
        weight = base.get_submodule(path).weight
        applied = (weight.to(wide) + delta).to(dtype)  # what a client does: W + diff, in the diff's precision
        assert torch.equal(applied, layer.base_layer.weight), path


def test_merged_pipeline_and_model_folders_load_with_from_pretrained(tmp_path, unet_inputs):
    base_dir = save_tiny_sd(tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(str(base_dir))
    do.add_adapter(pipe.unet, do.AdapterConfig(method="boft", block_size=4, n_butterfly_factors=2, magnitude=True))
    do.add_adapter(pipe.text_encoder, do.AdapterConfig(method="oft", block_size=8, target_modules=("q_proj", "v_proj")))
    randomize(pipe.unet)
    randomize(pipe.text_encoder, seed=4)
    do.save_adapter(pipe, tmp_path / "adapter.safetensors")
    ids = pipe.tokenizer(["a photo"], return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = run_unet(pipe.unet, unet_inputs), pipe.text_encoder(ids)[0]
    do.merge_adapter(pipe.unet)
    do.merge_adapter(pipe.text_encoder)
    with torch.no_grad():
        merged = run_unet(pipe.unet, unet_inputs), pipe.text_encoder(ids)[0]

    out = convert(tmp_path / "adapter.safetensors", "merged", tmp_path / "merged", model=base_dir)
    loaded = DiffusionPipeline.from_pretrained(str(out))
    assert not any(isinstance(m, do.OrthoLinear) for m in loaded.unet.modules())
    with torch.no_grad():
        result = run_unet(loaded.unet, unet_inputs), loaded.text_encoder(ids)[0]
    for got, want_merged, want_adapted in zip(result, merged, adapted, strict=True):
        assert torch.equal(got, want_merged)
        assert (got - want_adapted).abs().max().item() <= 1e-5
    # the merged pipeline still generates
    loaded.set_progress_bar_config(disable=True)
    image = loaded("a photo", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3)

    # a UNet folder alone
    unet_only = make_tiny_unet()
    unet_only.save_pretrained(str(tmp_path / "unet_base"))
    adapter_unet = make_tiny_unet()
    do.add_adapter(adapter_unet, do.AdapterConfig(method="ether_plus", num_blocks=2))
    randomize(adapter_unet)
    do.save_adapter(adapter_unet, tmp_path / "ether_plus.safetensors")
    expected = run_unet(adapter_unet, unet_inputs)
    convert(tmp_path / "ether_plus.safetensors", "merged", tmp_path / "unet_merged", model=tmp_path / "unet_base")
    reloaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet_merged"))
    assert (run_unet(reloaded, unet_inputs) - expected).abs().max().item() <= 1e-5


def test_pipeline_adapter_round_trips_through_kohya_with_text_encoder(tmp_path):
    pipe = tiny_sd_pipeline()
    do.add_adapter(pipe.unet, do.AdapterConfig(method="boft", block_size=4, n_butterfly_factors=2, side="output"))
    do.add_adapter(
        pipe.text_encoder,
        do.AdapterConfig(
            method="oft", block_size=8, side="output", target_modules=("q_proj", "k_proj", "v_proj", "out_proj")
        ),
    )
    randomize(pipe.unet)
    randomize(pipe.text_encoder, seed=4)
    do.save_adapter(pipe, tmp_path / "adapter.safetensors")
    convert(tmp_path / "adapter.safetensors", "kohya", tmp_path / "kohya.safetensors")
    keys = load_file(tmp_path / "kohya.safetensors").keys()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.oft_blocks" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.oft_blocks" in keys
    fresh = tiny_sd_pipeline()
    do.load_adapter(fresh, tmp_path / "kohya.safetensors")
    for comp in ("unet", "text_encoder"):
        ours = dict(do.model.named_ortho_layers(getattr(pipe, comp)))
        theirs = dict(do.model.named_ortho_layers(getattr(fresh, comp)))
        assert ours.keys() == theirs.keys()
        with torch.no_grad():  # each layer built on its own (a training build's length follows its batch)
            for path in ours:
                assert torch.equal(ours[path].adapted_weight(), theirs[path].adapted_weight()), path
    # one component of a two-component file into a bare model
    with pytest.raises(do.AdapterFileError, match="pass component="):
        do.load_adapter(tiny_sd_pipeline().unet, tmp_path / "kohya.safetensors")
    te = tiny_sd_pipeline().text_encoder
    do.load_adapter(te, tmp_path / "kohya.safetensors", component="text_encoder")
    assert len(do.model.named_ortho_layers(te)) == len(do.model.named_ortho_layers(pipe.text_encoder))
    # and to our own format from the kohya file, without a model at hand
    out = convert(tmp_path / "kohya.safetensors", "diffusion-oft", tmp_path / "back.safetensors")
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["format"] == "diffusion-oft"
    again = tiny_sd_pipeline()
    do.load_adapter(again, out)
    path = next(p for p, _ in do.model.named_ortho_layers(pipe.text_encoder) if p.endswith("1.self_attn.out_proj"))
    assert torch.equal(
        again.text_encoder.get_submodule(path).adapted_weight(), pipe.text_encoder.get_submodule(path).adapted_weight()
    )


def test_convert_command(tmp_path, capsys):
    unet = make_tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(method="oft", block_size=8, side="output", magnitude=True))
    randomize(unet)
    do.save_adapter(unet, tmp_path / "oft.safetensors")
    assert (
        main(["convert", str(tmp_path / "oft.safetensors"), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")])
        == 0
    )
    printed = capsys.readouterr().out
    assert "note: unet adapter (oft, side=output): the per-output scale is written as LyCORIS 'rescale'" in printed
    assert "wrote" in printed and (tmp_path / "k.safetensors").is_file()

    ether = make_tiny_unet()
    do.add_adapter(ether, do.AdapterConfig(method="ether", num_blocks=2))
    do.save_adapter(ether, tmp_path / "ether.safetensors")
    assert main(["convert", str(tmp_path / "ether.safetensors"), "--to", "peft", "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffusion-oft convert: error:") and "PEFT has no ETHER" in err and "\n" not in err
    assert (
        main(["convert", str(tmp_path / "ether.safetensors"), "--to", "diff", "-o", str(tmp_path / "d.safetensors")])
        == 2
    )
    assert "needs the base model" in capsys.readouterr().err
    unet_dir = tmp_path / "unet_base"
    make_tiny_unet().save_pretrained(str(unet_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        code = main(
            [
                "convert",
                str(tmp_path / "ether.safetensors"),
                "--to",
                "diff",
                "-o",
                str(tmp_path / "d.safetensors"),
                "--model",
                str(unet_dir),
            ]
        )
    assert code == 0 and len(load_file(tmp_path / "d.safetensors")) == 32


def test_conversion_warnings_are_warnings(tmp_path):
    unet = make_tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(method="oft", block_size=8, side="output", magnitude=True))
    do.save_adapter(unet, tmp_path / "a.safetensors")
    with pytest.warns(ConversionWarning, match="rescale"):
        convert(tmp_path / "a.safetensors", "kohya", tmp_path / "k.safetensors")
