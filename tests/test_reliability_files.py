"""Reliability: hostile or broken adapter files, tried systematically (property-based, hypothesis).

Property: ``load_adapter`` on a damaged file either loads (the damage was harmless, e.g. a float64
tensor) or raises ``AdapterFileError`` with a one-line message; after an error the model is
unchanged (same state_dict keys and values, same module types).  Damage that can never be
harmless (truncation, NaN/inf, wrong shape, missing key, integer dtype, future version...) must
raise.  No pickle is ever opened.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import METHOD_CONFIGS, make_tiny_unet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save, save_file

import diffusion_oft as do
from diffusion_oft.files import read_adapter_file

SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)
KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.skew"
_CACHE: dict[str, tuple[dict, dict, bytes]] = {}


def valid_file(method: str = "oft") -> tuple[dict[str, torch.Tensor], dict[str, str], bytes]:
    """(tensors, metadata, file bytes) of a trained adapter of the tiny UNet (built once)."""
    if method not in _CACHE:
        unet = make_tiny_unet()
        do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS[method]))
        torch.manual_seed(3)
        with torch.no_grad():
            for p in do.adapter_parameters(unet):
                p.add_(torch.randn_like(p) * 0.1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "a.safetensors"
            do.save_adapter(unet, path)
            tensors, meta = read_adapter_file(path)
            _CACHE[method] = (tensors, meta, path.read_bytes())
    return _CACHE[method]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)


def try_load(data: bytes, must_fail: bool, suffix: str = ".safetensors", match: str | None = None) -> None:
    """Load ``data`` as a file into a fresh tiny UNet and check the property."""
    unet = make_tiny_unet()
    snap = snapshot(unet)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"adapter{suffix}"
        path.write_bytes(data)
        try:
            do.load_adapter(unet, path)
        except do.AdapterFileError as err:
            message = str(err)
            assert "\n" not in message and 0 < len(message) <= 600, message
            assert path.name in message or "adapter" in message
            if match:
                assert match in message, message
            assert_unchanged(unet, snap)
            return
        # any other exception type propagates and fails the test
    assert not must_fail, "a damaged file was loaded"


def file_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


# ---- byte-level damage --------------------------------------------------------------------------------
@SETTINGS
@given(st.data())
@pytest.mark.slow  # fuzzing of damaged files
def test_truncated_files_are_refused(data):
    raw = valid_file()[2]
    cut = data.draw(st.integers(0, len(raw) - 1))
    try_load(raw[:cut], must_fail=True)


@SETTINGS
@given(st.data())
@pytest.mark.slow  # fuzzing of damaged files
def test_damaged_header_bytes(data):
    raw = bytearray(valid_file()[2])
    header_len = int.from_bytes(raw[:8], "little") + 8
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, header_len - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try_load(bytes(raw), must_fail=False)


@SETTINGS
@given(st.binary(max_size=200))
@pytest.mark.slow  # fuzzing of damaged files
def test_random_bytes(blob):
    try_load(blob, must_fail=True)


# ---- tensor-level damage ------------------------------------------------------------------------------
BAD_DTYPES = [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]
OK_DTYPES = [torch.float16, torch.bfloat16, torch.float64]


@SETTINGS
@given(st.data())
@pytest.mark.slow  # fuzzing of damaged files
def test_tensor_damage(data):
    tensors, meta, _ = valid_file()
    tensors = dict(tensors)
    key = data.draw(st.sampled_from(sorted(tensors)))
    kind = data.draw(st.sampled_from(["dtype", "ok_dtype", "shape", "missing", "extra", "nonfinite"]))
    must_fail = kind not in ("ok_dtype",)
    if kind == "dtype":
        tensors[key] = tensors[key].to(data.draw(st.sampled_from(BAD_DTYPES)))
    elif kind == "ok_dtype":
        tensors[key] = tensors[key].to(data.draw(st.sampled_from(OK_DTYPES)))
    elif kind == "shape":
        shape = data.draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
        must_fail = tuple(shape) != tuple(tensors[key].shape)
        tensors[key] = torch.zeros(shape)
    elif kind == "missing":
        del tensors[key]
    elif kind == "extra":
        name = data.draw(st.text(min_size=1, max_size=30))
        extra = "unet." + name if data.draw(st.booleans()) else name
        must_fail = extra not in tensors
        tensors[extra] = torch.zeros(2)
    else:
        value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        flat = tensors[key].flatten().clone()
        flat[data.draw(st.integers(0, flat.numel() - 1))] = value
        tensors[key] = flat.reshape(tensors[key].shape)
    try_load(file_bytes(tensors, meta), must_fail=must_fail)


# ---- metadata-level damage ----------------------------------------------------------------------------
@SETTINGS
@given(st.data())
@pytest.mark.slow  # fuzzing of damaged files
def test_metadata_damage(data):
    tensors, meta, _ = valid_file()
    meta = dict(meta)
    key = data.draw(st.sampled_from(["format", "format_version", "adapter_config", "base_model", "new"]))
    how = data.draw(st.sampled_from(["delete", "text", "json"]))
    if how == "delete":
        meta.pop(key, None)
    elif how == "text":
        meta[key] = data.draw(st.text(max_size=20))
    else:
        meta[key] = json.dumps(data.draw(json_values))
    must_fail = key in ("format", "format_version", "adapter_config") and meta.get(key) != valid_file()[1].get(key)
    if key == "format_version":
        must_fail = must_fail and meta.get(key, "").strip() not in ("1", "0", "-0", "+1", "+0")
    try_load(file_bytes(tensors, meta), must_fail=must_fail)


@SETTINGS
@given(
    st.sampled_from(["base_model", "adapter_config", "format_version"]),
    st.text(max_size=12) | json_values.map(json.dumps),
)
def test_adapter_info_on_damaged_metadata(key, value):
    """``diffusion-oft info`` reads untrusted files too: an answer or a one-line AdapterFileError."""
    tensors, meta, _ = valid_file()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        path.write_bytes(file_bytes(tensors, {**meta, key: value}))
        try:
            info = do.adapter_info(path)
        except do.AdapterFileError as err:
            assert "\n" not in str(err)
        else:
            assert set(info["components"]) <= {"unet"}


CONFIG_FIELDS = list(do.AdapterConfig().to_dict()) + ["unknown_field"]


@SETTINGS
@given(st.data())
@pytest.mark.slow  # fuzzing of damaged files
def test_config_fields_of_wrong_types(data):
    """Valid JSON, but the wrong value or type in one field of the component's config."""
    tensors, meta, _ = valid_file()
    configs = json.loads(meta["adapter_config"])
    field = data.draw(st.sampled_from(CONFIG_FIELDS))
    configs["unet"][field] = data.draw(json_values)
    try_load(file_bytes(tensors, {**meta, "adapter_config": json.dumps(configs)}), must_fail=False)


@SETTINGS
@given(json_values)
@pytest.mark.slow  # fuzzing of damaged files
def test_adapter_config_of_the_wrong_shape(value):
    tensors, meta, _ = valid_file()
    try_load(file_bytes(tensors, {**meta, "adapter_config": json.dumps(value)}), must_fail=True)


# ---- specific cases with their messages ---------------------------------------------------------------
def test_named_cases_give_clear_one_line_errors():
    tensors, meta, raw = valid_file()
    cases = {
        "truncated": (raw[: len(raw) // 2], "not a readable safetensors file"),
        "wrong header": (b"\xff" * 8 + raw[8:], "not a readable safetensors file"),
        "empty": (b"", "not a readable safetensors file"),
        "future": (file_bytes(tensors, {**meta, "format_version": "2"}), "newer than this diffusion-oft"),
        "version text": (file_bytes(tensors, {**meta, "format_version": "one"}), "bad format_version"),
        "no metadata": (file_bytes(tensors, None), "not a diffusion-oft adapter"),
        "config list": (file_bytes(tensors, {**meta, "adapter_config": "[1, 2]"}), "bad adapter_config"),
        "config str": (file_bytes(tensors, {**meta, "adapter_config": '{"unet": "oft"}'}), "bad adapter_config"),
        "no component": (file_bytes(tensors, {**meta, "adapter_config": "{}"}), "lists no component"),
        "int field": (
            file_bytes(
                tensors,
                {
                    **meta,
                    "adapter_config": meta["adapter_config"].replace('"neumann_terms": 5', '"neumann_terms": "5"'),
                },
            ),
            "bad adapter_config",
        ),
        "nan": (file_bytes({**tensors, KEY: tensors[KEY] * float("nan")}, meta), "NaN or inf"),
        "int dtype": (file_bytes({**tensors, KEY: tensors[KEY].int()}, meta), "dtype torch.int32"),
    }
    for blob, message in cases.values():
        try_load(blob, must_fail=True, match=message)


def test_file_for_another_method_or_base_model():
    # another method: the metadata says ETHER, the tensors are OFT's skew blocks
    tensors, meta, _ = valid_file("oft")
    configs = json.loads(meta["adapter_config"])
    configs["unet"] = do.AdapterConfig(**METHOD_CONFIGS["ether"]).to_dict()
    try_load(file_bytes(tensors, {**meta, "adapter_config": json.dumps(configs)}), True, match="tensor")
    # a real BOFT file is fine on the same base model, and a real file for another base model is refused
    try_load(valid_file("boft")[2], must_fail=False)
    other = make_tiny_unet(cross_attention_dim=48)
    snap = snapshot(other)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        path.write_bytes(valid_file("oft")[2])
        with pytest.raises(do.AdapterFileError, match="expects"):
            do.load_adapter(other, path)
    assert_unchanged(other, snap)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl", ".BIN"])
def test_pickle_inputs_are_refused_with_a_hint(tmp_path, suffix, monkeypatch):
    path = tmp_path / f"adapter{suffix}"
    torch.save({"x": torch.zeros(1)}, path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    unet = make_tiny_unet()
    snap = snapshot(unet)
    with pytest.raises(do.AdapterFileError, match=r"never loaded.*convert it to \.safetensors"):
        do.load_adapter(unet, path)
    assert_unchanged(unet, snap)


def test_safetensors_named_file_with_pickle_content_is_not_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    with pytest.raises(do.AdapterFileError, match="not a readable safetensors file"):
        do.load_adapter(make_tiny_unet(), path)


def test_adapter_files_are_written_atomically(tmp_path, monkeypatch):
    """A crash during the write leaves the previous file intact and no temporary file behind."""
    import diffusion_oft.files as files

    tensors, meta, raw = valid_file()
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(raw)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_save_file(tensors, path, meta)
    assert path.read_bytes() == raw
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]
    monkeypatch.setattr(files, "save_file", save_file)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_end_with_the_permissions_of_a_plain_write(tmp_path, umask):
    """Atomic writes go through a mkstemp file (mode 0600); the result must have what open(..., "w")
    would give: 0666 less the umask for a new file, the old mode for a replaced one."""
    import os
    import stat

    from diffusion_oft.files import atomic_save_file

    old = os.umask(umask)
    try:
        new = tmp_path / "new.safetensors"
        atomic_save_file({"x": torch.zeros(2)}, new, {})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
        os.chmod(new, 0o600)  # a user's choice for an existing file is kept
        atomic_save_file({"x": torch.ones(2)}, new, {})
        assert stat.S_IMODE(new.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    unet = make_tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(**METHOD_CONFIGS["oft"]))
    saved = do.save_adapter(unet, tmp_path / "adapter.safetensors")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~old
