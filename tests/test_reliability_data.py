"""Reliability: bad training data and resource faults, each with its documented behaviour.

convert:  CMYK, 16-bit, palette (with transparency), RGBA, animated (first frame), EXIF-rotated,
          unicode file names -> 8-bit RGB, transparency on white.
skip:     corrupt, truncated, zero-byte, non-image files, decompression bombs -> one warning that
          counts and names them (``--strict``: stop on the first with a one-line error).
captions: metadata.jsonl rows without a usable caption -> empty prompt, one counted warning.
resources: an output dir that cannot be written or whose disk is full -> error before any model loads.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

from diffusion_oft.cli import main as cli_main
from diffusion_oft.tiny import save_tiny_sd
from diffusion_oft.training import checkpoints
from diffusion_oft.training.control_data import records_from_folder
from diffusion_oft.training.data import BadDataWarning, list_images, load_rgb
from diffusion_oft.training.dreambooth import main as train_main

UNICODE_NAME = "ünïcødé 写真 ☃.png"


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_messy_folder(folder):
    """Every kind of file a user may drop into an instance folder. Returns (good names, bad names)."""
    folder.mkdir(parents=True)
    good = {}
    Image.new("RGB", (24, 24), (40, 60, 200)).save(folder / "plain.png")
    good["plain.png"] = ((24, 24), (40, 60, 200))
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(folder / "cmyk.jpg", quality=100)
    good["cmyk.jpg"] = ((24, 24), (255, 0, 255))
    Image.fromarray(np.full((24, 24), 32768, dtype=np.uint16)).save(folder / "gray16.png")  # mode I;16
    good["gray16.png"] = ((24, 24), (128, 128, 128))
    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(folder / "palette.png")
    good["palette.png"] = ((24, 24), (10, 200, 30))
    transparent_p = Image.new("P", (24, 24), 0)
    transparent_p.putpalette([0, 0, 0] + [0] * 765)
    transparent_p.save(folder / "palette_transparent.gif", transparency=0)
    good["palette_transparent.gif"] = ((24, 24), (255, 255, 255))
    Image.new("RGBA", (24, 24), (200, 10, 10, 0)).save(folder / "rgba.png")  # fully transparent: white
    good["rgba.png"] = ((24, 24), (255, 255, 255))
    frames = [Image.new("RGB", (24, 24), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    good["animated.gif"] = ((24, 24), None)  # the first frame (GIF palettes: colour approximately red)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (30, 20), (90, 90, 90)).save(folder / "rotated.jpg", exif=exif, quality=100)
    good["rotated.jpg"] = ((20, 30), None)  # width / height swapped by the EXIF transpose
    Image.new("RGB", (24, 24), (1, 2, 3)).save(folder / UNICODE_NAME)
    good[UNICODE_NAME] = ((24, 24), (1, 2, 3))
    # what is skipped (or stops a --strict run)
    real = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(real[: len(real) // 2])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "script.py").write_text("print('x')")
    Image.new("L", (200, 200)).save(folder / "bomb.png")  # a "bomb" once MAX_IMAGE_PIXELS is lowered
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are ignored silently
    (folder / "subfolder").mkdir()
    bad = ["bomb.png", "corrupt.png", "notes.txt", "script.py", "truncated.jpg", "zero.png"]
    return good, bad


@pytest.fixture
def messy(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 > 2x the limit: DecompressionBombError
    folder = tmp_path / "messy"
    good, bad = make_messy_folder(folder)
    return folder, good, bad


def test_default_skips_bad_files_with_one_counted_warning(messy):
    folder, good, bad = messy
    with pytest.warns(BadDataWarning) as record:
        images = list_images(folder)
    assert sorted(p.name for p in images) == sorted(good)
    assert len(record) == 1
    message = str(record[0].message)
    assert f"skipped {len(bad)} of {len(bad) + len(good)} files" in message and "--strict" in message
    for name in bad[:5]:
        assert name in message
    assert "and 1 more" in message


@pytest.mark.parametrize(
    "name, reason",
    [
        ("bomb.png", "decompression bomb"),
        ("corrupt.png", "not a readable image"),
        ("zero.png", "not a readable image"),
        ("truncated.jpg", "truncated"),
        ("notes.txt", "is not an image"),
    ],
)
def test_strict_stops_on_each_bad_file_with_a_clear_error(tmp_path, monkeypatch, name, reason):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    folder = tmp_path / "messy"
    make_messy_folder(folder)
    for other in folder.iterdir():  # leave only the good files and the one bad file
        if (
            other.is_file()
            and other.name != name
            and other.name in ("bomb.png", "corrupt.png", "zero.png", "truncated.jpg", "notes.txt", "script.py")
        ):
            other.unlink()
    with pytest.raises(ValueError, match=reason) as info:
        list_images(folder, strict=True)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_convertible_images_load_as_rgb(messy):
    folder, good, _ = messy
    for name, (size, colour) in good.items():
        image = load_rgb(folder / name)
        assert image.mode == "RGB" and image.size == size, name
        if colour is not None:
            pixel = np.asarray(image)[size[1] // 2, size[0] // 2].astype(int)
            assert np.abs(pixel - colour).max() <= 3, (name, pixel, colour)
    first = np.asarray(load_rgb(folder / "animated.gif"))[12, 12].astype(int)
    assert first[0] > 200 and first[1] < 50 and first[2] < 50  # red: the first frame


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd")


def argv(model, data, out, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        "a photo of sks thing",
        "--output_dir",
        str(out),
        "--resolution",
        "16",
        "--report_to",
        "none",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "100",
        *extra,
    ]


@pytest.mark.slow  # end to end: training
def test_training_on_a_messy_folder_default_and_strict(messy, tiny_model, tmp_path, capsys):
    folder, good, bad = messy
    with pytest.warns(BadDataWarning, match=f"skipped {len(bad)}"):
        # one batch with every readable image: each goes through the loader's conversions
        result = train_main(argv(tiny_model, folder, tmp_path / "out", "--train_batch_size", str(len(good))))
    assert result["global_step"] == 2 and (tmp_path / "out" / "adapter.safetensors").is_file()
    assert cli_main(["train", "dreambooth", *argv(tiny_model, folder, tmp_path / "strict", "--strict")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and "bomb.png" in last  # the first bad file in sorted order


def test_missing_captions_in_metadata_jsonl(tmp_path):
    folder = tmp_path / "control"
    folder.mkdir()
    rows = [
        {"file_name": "a.png", "text": "a cat"},
        {"file_name": "b.png"},
        {"file_name": "c.png", "text": None},
        {"file_name": "d.png", "text": "  "},
        {"file_name": "e.png", "text": 5},
    ]
    for row in rows:
        Image.new("RGB", (16, 16)).save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    with pytest.warns(BadDataWarning, match=r"4 of 5 rows have no 'text' caption \(lines \[2, 3, 4, 5\]\)"):
        records = records_from_folder(folder, "file_name", "conditioning_image", "text", need_condition=False)
    assert [item["text"] for item in records.items] == ["a cat", "", "", "", ""]
    (folder / "metadata.jsonl").write_text('["a.png"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON object per line"):
        records_from_folder(folder, "file_name", "conditioning_image", "text", need_condition=False)


# ---- resource faults --------------------------------------------------------------------------------------
def test_unwritable_output_dir_fails_before_training(messy, tiny_model, tmp_path, capsys, monkeypatch):
    folder = messy[0]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # an output dir "inside" a file: cannot be created (also as root)
    loaded = []
    monkeypatch.setattr("diffusion_oft.training.subject.load_base_model", lambda *a, **k: loaded.append(1))
    assert cli_main(["train", "dreambooth", *argv(tiny_model, folder, blocker / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--output_dir" in last and "cannot write there" in last and not loaded

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # as root, chmod cannot make a folder read-only
    with pytest.raises(ValueError, match=r"cannot write there \(Read-only file system\)"):
        checkpoints.check_output_dir(tmp_path / "ro")


def test_full_disk_fails_before_training(messy, tiny_model, tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    loaded = []
    monkeypatch.setattr("diffusion_oft.training.subject.load_base_model", lambda *a, **k: loaded.append(1))
    assert cli_main(["train", "dreambooth", *argv(tiny_model, messy[0], tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "only 10 MiB free" in last and "needs at least 256 MiB" in last and not loaded
