"""Adapter files: bit-exact round trips, validation before mutation, untrusted input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import METHOD_CONFIGS, make_tiny_unet, run_unet
from safetensors import safe_open
from safetensors.torch import save_file

import diffusion_oft as do
from diffusion_oft.files import read_adapter_file
from diffusion_oft.layers import OrthoLinear


def trained_file(tmp_path, method: str, **extra) -> tuple[str, torch.Tensor]:
    unet = make_tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS[method], **extra))
    torch.manual_seed(7)
    with torch.no_grad():
        for p in do.adapter_parameters(unet):
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path / f"{method}.safetensors"
    do.save_adapter(unet, path)
    return str(path), unet


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_save_load_round_trip_is_bit_exact(tmp_path, unet_inputs, method):
    path, unet = trained_file(tmp_path, method, magnitude=method == "boft")
    expected = run_unet(unet, unet_inputs)
    fresh = make_tiny_unet()
    do.load_adapter(fresh, path)
    assert torch.equal(run_unet(fresh, unet_inputs), expected)
    for p in do.adapter_parameters(fresh):  # trainable like the saved one: the same training-mode path
        p.requires_grad_(True)
    assert torch.equal(run_unet(fresh, unet_inputs, grad=True).detach(), run_unet(unet, unet_inputs, grad=True))


def test_file_layout(tmp_path):
    path, unet = trained_file(tmp_path, "oft")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "diffusion-oft" and meta["format_version"] == "1"
    assert json.loads(meta["adapter_config"])["unet"]["method"] == "oft"
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.skew" in keys
    assert len(keys) == 32  # one tensor per adapted projection, nothing from the base model
    info = do.adapter_info(path)
    assert info["components"]["unet"]["num_parameters"] == do.count_adapter_parameters(unet)


def _snapshot(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def _assert_untouched(unet, snapshot):
    assert not any(isinstance(m, OrthoLinear) for m in unet.modules())
    assert set(unet.state_dict()) == set(snapshot)
    assert all(torch.equal(v, snapshot[k]) for k, v in unet.state_dict().items())


def test_mismatched_model_fails_clearly_and_stays_unchanged(tmp_path):
    path, _ = trained_file(tmp_path, "oft")
    other = make_tiny_unet(cross_attention_dim=48)  # to_k / to_v of attn2 have another input size
    snapshot = _snapshot(other)
    with pytest.raises(do.AdapterFileError, match=r"attn2\.to_k.*expects \[6, 28\]"):
        do.load_adapter(other, path)
    _assert_untouched(other, snapshot)


def test_wrong_shape_missing_and_extra_keys(tmp_path):
    path, _ = trained_file(tmp_path, "oft")
    tensors, meta = read_adapter_file(path)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.skew"
    cases = {
        "shape": ({**tensors, key: torch.zeros(3, 28)}, r"has shape \[3, 28\].*expects \[4, 28\]"),
        "missing": ({k: v for k, v in tensors.items() if k != key}, "missing tensor"),
        "extra": ({**tensors, "unet.conv_in.skew": torch.zeros(1)}, "unexpected tensor 'unet.conv_in.skew'"),
        "nan": ({**tensors, key: torch.full((4, 28), float("nan"))}, "NaN or inf"),
        "dtype": ({**tensors, key: torch.zeros(4, 28, dtype=torch.int32)}, "dtype torch.int32"),
    }
    for name, (bad, message) in cases.items():
        bad_path = tmp_path / f"{name}.safetensors"
        save_file(bad, str(bad_path), metadata=meta)
        unet = make_tiny_unet()
        snapshot = _snapshot(unet)
        with pytest.raises(do.AdapterFileError, match=message):
            do.load_adapter(unet, bad_path)
        _assert_untouched(unet, snapshot)


def test_metadata_problems(tmp_path):
    path, _ = trained_file(tmp_path, "oft")
    tensors, meta = read_adapter_file(path)
    cases = {
        "future": ({**meta, "format_version": "99"}, "newer than this diffusion-oft"),
        "noconfig": ({k: v for k, v in meta.items() if k != "adapter_config"}, "no adapter_config"),
        "badjson": ({**meta, "adapter_config": "{not json"}, "bad adapter_config"),
        "foreign": ({}, "not a diffusion-oft adapter"),
    }
    for name, (bad_meta, message) in cases.items():
        bad_path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(bad_path), metadata=bad_meta or None)
        with pytest.raises(do.AdapterFileError, match=message):
            do.load_adapter(make_tiny_unet(), bad_path)


def test_broken_and_pickle_files_are_refused(tmp_path):
    path, _ = trained_file(tmp_path, "oft")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for bad in (truncated, garbage):
        with pytest.raises(do.AdapterFileError, match="not a readable safetensors file"):
            do.load_adapter(make_tiny_unet(), bad)
    pickled = tmp_path / "adapter.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(do.AdapterFileError, match="never loaded"):
        do.load_adapter(make_tiny_unet(), pickled)


def test_loading_twice_needs_another_name(tmp_path, unet_inputs):
    path, _ = trained_file(tmp_path, "ether_plus")
    unet = make_tiny_unet()
    do.load_adapter(unet, path)
    with pytest.raises(do.AdapterFileError, match="already has an adapter named 'default'"):
        do.load_adapter(unet, path)
    do.load_adapter(unet, path, adapter_name="second")
    assert set(do.model.adapter_configs(unet)) == {"default", "second"}
