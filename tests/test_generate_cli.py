"""`diffusion-oft generate` (and `info`'s base-model hints) on a tiny model saved to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image
from PIL import Image
from test_control import RES, make_control_folder
from test_pipelines import TEXT_TARGETS, make_sd, oft

import diffusion_oft as do
from diffusion_oft import cli
from diffusion_oft.inference import _input_width
from diffusion_oft.tiny import save_tiny_sd, tiny_sdxl_pipeline
from diffusion_oft.training.control import main as train_control

pytestmark = pytest.mark.slow  # end to end: the command line

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = save_tiny_sd(root / "model")
    pipe = make_sd()
    do.add_adapter(pipe.unet, oft())
    subject = do.save_adapter(pipe, root / "subject.safetensors")
    pipe = make_sd()
    do.add_adapter(pipe.unet, do.AdapterConfig(method="ether", num_blocks=2))
    do.add_adapter(pipe.text_encoder, oft(target_modules=TEXT_TARGETS))
    style = do.save_adapter(pipe, root / "style.safetensors")
    sdxl = tiny_sdxl_pipeline()
    do.add_adapter(sdxl.text_encoder_2, oft(target_modules=TEXT_TARGETS))
    other = do.save_adapter(sdxl, root / "sdxl.safetensors")
    return {"root": root, "model": model, "subject": subject, "style": style, "sdxl": other}


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffusion_oft", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("diffusion-oft")]


def expected_images(model, adapters, scales, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(base image, image with the adapters) made in this process."""
    pipe = AutoPipelineForText2Image.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def image():
        out = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
        return np.asarray(out.images[0], dtype=np.int16)

    base = image()
    do.load_adapters(pipe, adapters, weights=scales)
    return base, image()


def test_generate_writes_pngs_grid_and_settings(files, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "generate",
        "--model", str(files["model"]),
        "--adapter", str(files["subject"]),
        "--adapter", str(files["style"]),
        "--adapter_scale", "1.0", "0.5",
        "--prompt", "a photo of sks dog",
        "--num_images", "2",
        "--steps", "2",
        "--seed", "3",
        "--output_dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = [out / "000-seed3.png", out / "001-seed4.png"]
    for path in [*pngs, out / "grid.png"]:
        assert path.is_file() and str(path) in result.stdout
    assert "image 1/2" in result.stderr and "image 2/2" in result.stderr  # a progress bar per image
    assert Image.open(out / "grid.png").size == (32, 16)  # two 16x16 images side by side
    settings = json.loads((out / "generation.json").read_text())
    assert [a["name"] for a in settings["adapters"]] == ["subject", "style"]
    assert [a["scale"] for a in settings["adapters"]] == [1.0, 0.5]
    assert [i["seed"] for i in settings["images"]] == [3, 4]

    written = np.asarray(Image.open(pngs[0]), dtype=np.int16)
    base, expected = expected_images(files["model"], [files["subject"], files["style"]], [1.0, 0.5], seed=3)
    assert np.abs(written - expected).max() <= 1  # the adapters were loaded as asked
    assert np.abs(written - base).max() > 5


def test_generate_merge_and_scheduler_in_process(files, tmp_path, capsys):
    args = ["generate", "--model", str(files["model"]), "--adapter", str(files["subject"])]
    args += ["--prompt", "a photo of sks dog", "--num_images", "1", "--steps", "2", "--seed", "3"]
    assert cli.main([*args, "--output_dir", str(tmp_path / "a")]) == 0
    # merged, and the scheduler swapped for a fresh one of the tiny model's own class (same images)
    assert cli.main([*args, "--merge", "--scheduler", "ddpm", "--output_dir", str(tmp_path / "b")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "000-seed3.png"), dtype=np.int16) for d in "ab")
    assert np.abs(a - b).max() <= 1  # merged weights give the same images
    settings = json.loads((tmp_path / "b" / "generation.json").read_text())
    assert settings["merged"] and settings["scheduler"] == "DDPMScheduler"
    assert "grid.png" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_adapter", "adapter_for_another_model"])
def test_wrong_inputs_give_one_line_and_exit_2(files, tmp_path, case):
    args = ["generate", "--model", str(files["model"]), "--prompt", "x", "--output_dir", str(tmp_path / "o")]
    if case == "missing_adapter":  # found before the model is loaded
        args += ["--adapter", str(tmp_path / "nope.safetensors")]
    else:  # found once the model is loaded
        args += ["--adapter", str(files["sdxl"]), "--steps", "1"]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(error_lines(result.stderr)) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_more_wrong_inputs_in_process(files, tmp_path, capsys):
    pickle_file = tmp_path / "adapter.bin"
    pickle_file.write_bytes(b"x")
    image = tmp_path / "edges.png"
    Image.new("RGB", (16, 16)).save(image)
    model = str(files["model"])
    cases = {
        "no such folder": ["--model", str(tmp_path / "a" / "b" / "c")],
        "no model_index.json": ["--model", str(tmp_path)],
        "unknown --scheduler": ["--model", model, "--scheduler", "nonsense"],
        "does not fit": ["--model", model, "--scheduler", "flow_euler"],
        "multiple of 8": ["--model", model, "--height", "30"],
        "one per --adapter": ["--model", model, "--adapter", str(files["subject"]), "--adapter_scale", "1", "2"],
        "pickle": ["--model", model, "--adapter", str(pickle_file)],
        "needs exactly one --adapter trained by": ["--model", model, "--control_image", str(image)],
        "train control`": ["--model", model, "--adapter", str(files["subject"]), "--control_image", str(image)],
        "--control_scale was given without": ["--model", model, "--control_scale", "0.5"],
        "one per image (4)": ["--model", model, "--num_images", "4", "--control_image", str(image), str(image)],
        "--num_images must be": ["--model", model, "--num_images", "0"],
        "--steps must be": ["--model", model, "--steps", "0"],
        "built-in models": ["--model", "builtin:nothing"],
    }
    for expected, extra in cases.items():
        code = cli.main(["generate", "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2, (expected, err)
        lines = error_lines(err)
        assert len(lines) == 1 and expected in lines[0], (expected, err)


def test_generate_with_control_image_in_process(files, tmp_path, capsys):
    data = make_control_folder(tmp_path / "data", n=2)
    run = tmp_path / "control"
    train_control([
        "--pretrained_model_name_or_path", str(files["model"]), "--train_data_dir", str(data), "--resolution",
        str(RES), "--max_train_steps", "3", "--learning_rate", "1e-2", "--encoder_learning_rate", "1e-1",
        "--report_to", "none", "--num_inference_steps", "1", "--num_validation_images", "1", "--seed", "0",
        "--output_dir", str(run),
    ])  # fmt: skip
    capsys.readouterr()
    args = ["generate", "--model", str(files["model"]), "--adapter", str(run / "adapter.safetensors")]
    args += ["--prompt", "a yellow circle", "--num_images", "1", "--steps", "2", "--seed", "3"]
    args += ["--height", "16", "--width", "16"]
    images = {}
    for name, cond in (("a", "cond_0.png"), ("b", "cond_1.png")):
        out = tmp_path / name
        code = cli.main([*args, "--control_image", str(data / cond), "--output_dir", str(out)])
        assert code == 0, capsys.readouterr().err[-2000:]
        assert (out / "000-seed3.png").is_file() and (out / "grid.png").is_file()
        images[name] = np.asarray(Image.open(out / "000-seed3.png"), dtype=np.int16)
    assert images["a"].shape == (16, 16, 3)
    assert np.abs(images["a"] - images["b"]).mean() > 0.5  # the condition reached the UNet
    settings = json.loads((tmp_path / "b" / "generation.json").read_text())
    assert settings["control_images"] == [str((data / "cond_1.png").resolve())]
    # a 32x32 condition is resized to the output size; --control_scale 0 is the adapter without the condition
    for name, cond in (("c", "cond_0.png"), ("d", "cond_1.png")):
        extra = ["--control_scale", "0", "--control_image", str(data / cond), "--output_dir", str(tmp_path / name)]
        assert cli.main([*args, *extra]) == 0
    c, d = (np.asarray(Image.open(tmp_path / x / "000-seed3.png"), dtype=np.int16) for x in "cd")
    assert np.array_equal(c, d)


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", "x"])  # no --prompt
    assert exit_info.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--prompt" in lines[0]


def test_info_prints_base_model_hints(files, capsys):
    assert cli.main(["info", str(files["style"])]) == 0
    out = capsys.readouterr().out
    assert "tiny test model" in out and "text encoder of width 32" in out
    assert cli.main(["info", "--json", str(files["subject"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "UNet2DConditionModel" in info["components"]["unet"]["base_model_hint"]


def test_input_width_from_tensor_shapes():
    assert _input_width("unet.x.attn2.to_k.skew", (24, 32 * 31 // 2)) == 768  # OFT b=32 on SD 1.x
    assert _input_width("unet.x.attn2.to_k.skew", (2, 256, 28)) == 2048  # BOFT m=2 b=8 on SDXL
    assert _input_width("unet.x.attn2.to_k.u_in", (4, 256)) == 1024  # ETHER n=4 on SD 2.x
    assert _input_width("unet.x.attn2.to_k.u_out", (4, 80)) is None  # output side: not the input width
