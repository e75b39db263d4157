"""Controllable generation: condition encoder, conv_in hook, extractors, training, pipeline, metric."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from training_helpers import read_tensors

import diffusion_oft as do
from diffusion_oft.cli import main as cli_main
from diffusion_oft.conditions import canny, canny_edges, edge_scores, make_condition
from diffusion_oft.control import (
    ConditionEncoder,
    ControlledUNet,
    attach_control,
    condition_encoder_for,
    detach_control,
    load_control,
    save_control,
)
from diffusion_oft.tiny import save_tiny_sd, tiny_unet
from diffusion_oft.training.control import main as train_main

REPO = Path(__file__).resolve().parents[1]
RES = 16


def shape_image(i: int, size: int = 32) -> tuple[Image.Image, str]:
    rng = np.random.default_rng(i)
    img = Image.new("RGB", (size, size), (30, 30, 60))
    draw = ImageDraw.Draw(img)
    x, y, r = (
        int(v)
        for v in (
            rng.integers(size // 4, 3 * size // 4),
            rng.integers(size // 4, 3 * size // 4),
            rng.integers(size // 8, size // 4),
        )
    )
    shape = ("circle", "square")[i % 2]
    (draw.ellipse if shape == "circle" else draw.rectangle)([x - r, y - r, x + r, y + r], fill=(230, 200, 40))
    return img, f"a yellow {shape}"


def make_control_folder(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img, text = shape_image(i)
        img.save(folder / f"img_{i}.png")
        canny(img).save(folder / f"cond_{i}.png")
        rows.append({"image": f"img_{i}.png", "conditioning_image": f"cond_{i}.png", "text": text})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


# ---- unit ------------------------------------------------------------------------------------------
def test_encoder_shapes_and_zero_init_changes_nothing():
    enc = ConditionEncoder(out_channels=320, downscale_factor=8)
    assert [f.shape for f in enc(torch.rand(1, 3, 64, 64))] == [(1, 320, 8, 8)]
    assert [c.out_channels for c in enc.blocks] == [16, 32, 32, 96, 96, 256]  # ControlNet's hint encoder
    sd = ConditionEncoder(out_channels=320, downscale_factor=8, down_channels=(320, 640, 1280))
    assert [tuple(f.shape) for f in sd(torch.rand(1, 3, 64, 64))] == [
        (1, 320, 8, 8),
        (1, 320, 4, 4),
        (1, 640, 2, 2),
        (1, 1280, 1, 1),
    ]  # SD 1.5: conv_in + 3 downsamplers
    unet = tiny_unet().eval()
    small = condition_encoder_for(unet, vae_scale_factor=2)
    assert small.config.down_channels == (32,)  # the tiny UNet has one downsampler
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    cond = torch.rand(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        plain = unet(sample, 10, text).sample
        controlled = ControlledUNet(unet, small)(sample, 10, text, cond).sample
    assert torch.equal(plain, controlled)  # zero convs: the base model exactly
    for head in (small.conv_out, small.heads[0]):  # each injection point alone moves the output
        with torch.no_grad():
            head.weight.normal_()
            changed = ControlledUNet(unet, small)(sample, 10, text, cond).sample
            again = unet(sample, 10, text).sample  # features are cleared after each call
            head.weight.zero_()
        assert not torch.allclose(plain, changed)
        assert torch.equal(plain, again)


def test_injection_only_through_the_encoder():
    """The hooks add exactly scale * features at conv_in and the downsampler, nothing else."""
    unet = tiny_unet().eval()
    enc = condition_encoder_for(unet, vae_scale_factor=2)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    sample, text, cond = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 5, 32, generator=g),
        torch.rand(1, 3, 16, 16, generator=g),
    )
    with torch.no_grad():
        feats = enc(cond)
        state = attach_control(unet)
        state.features, state.scale = feats, 0.5
        out_scaled = unet(sample, 10, text).sample
        state.features, state.scale = None, 1.0
    # a UNet whose conv_in / downsampler outputs get + 0.5 * features by hand gives the same sample
    with torch.no_grad():
        detach_control(unet)
        h1 = unet.conv_in.register_forward_hook(lambda m, i, o: o + 0.5 * feats[0])
        h2 = unet.down_blocks[0].downsamplers[0].register_forward_hook(lambda m, i, o: o + 0.5 * feats[1])
        by_hand = unet(sample, 10, text).sample
        h1.remove()
        h2.remove()
        assert torch.equal(out_scaled, by_hand)
        assert torch.equal(
            unet(sample, 10, text).sample, ControlledUNet(unet, enc)(sample, 10, text, cond, control_scale=0.0).sample
        )  # scale 0: the base model bit for bit


def test_hook_repeats_features_for_guidance_batches():
    unet = tiny_unet().eval()
    state = attach_control(unet)
    assert attach_control(unet) is state  # installed once
    state.features = torch.randn(1, 32, 8, 8)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        out2 = unet(sample, 10, text).sample
        out1 = unet(sample[:1], 10, text[:1]).sample
    assert torch.allclose(out2[:1], out1, atol=1e-5)
    state.features = torch.randn(1, 32, 4, 4)
    with pytest.raises(ValueError, match="do not fit conv_in"):
        unet(sample, 10, text)
    state.features = None


def test_canny_finds_square_outline_and_extractors():
    img = Image.new("RGB", (32, 32), "black")
    ImageDraw.Draw(img).rectangle([8, 8, 23, 23], fill="white")
    edges = canny_edges(img)
    assert edges[8:24, 7:9].any() and edges[8:24, 23:25].any()  # left and right sides
    assert not edges[12:20, 12:20].any() and not edges[:4, :4].any()  # flat areas
    for kind in ("canny", "sketch", "grayscale"):
        out = make_condition(img, kind)
        assert out.size == img.size and out.mode == "RGB"
    with pytest.raises(ValueError, match="unknown condition"):
        make_condition(img, "depth")
    scores = edge_scores(edges, edges)
    assert scores["iou"] == 1.0 and scores["f1"] == 1.0
    assert edge_scores(edges, np.zeros_like(edges))["f1"] == 0.0


def test_canny_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for i in range(3):
        img, _ = shape_image(i, size=48)
        arr = np.clip(np.asarray(img).astype(np.float32) + rng.normal(0, 10, (48, 48, 3)), 0, 255).astype(np.uint8)
        reference = cv2.Canny(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY), 100, 200) > 0
        assert edge_scores(reference, canny_edges(arr))["f1"] > 0.98


def test_save_load_pairing(tmp_path):
    unet = tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(method="oft", block_size=8))
    enc = condition_encoder_for(unet, 2)
    save_control(unet, enc, tmp_path / "a")
    other = condition_encoder_for(unet, 2)
    save_control(unet, other, tmp_path / "b")
    fresh = tiny_unet()
    loaded = load_control(fresh, tmp_path / "a")
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    shutil.copy(tmp_path / "b" / "condition_encoder.safetensors", tmp_path / "a" / "condition_encoder.safetensors")
    (tmp_path / "a" / "adapter.safetensors").write_bytes((tmp_path / "a" / "adapter.safetensors").read_bytes())
    do.save_adapter(unet, tmp_path / "c" / "adapter.safetensors", extra_metadata={"condition_encoder": "x.st"})
    with pytest.raises(FileNotFoundError):
        load_control(tiny_unet(), tmp_path / "c")


def test_encoder_round_trip_and_old_format_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from diffusion_oft.control import load_condition_encoder, save_condition_encoder

    unet = tiny_unet()
    enc = condition_encoder_for(unet, 2)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_()
    path = save_condition_encoder(enc, tmp_path / "condition_encoder.safetensors")
    loaded, meta = load_condition_encoder(path)
    assert meta["format_version"] == "2" and loaded.config.down_channels == (32,)
    assert loaded.state_dict().keys() == enc.state_dict().keys()
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    cond = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(enc(cond), loaded(cond), strict=True))
    # a format-1 file (conv_in only): refused with what to do
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(("downs.", "heads."))}
    meta["format_version"] = "1"
    meta["config"] = json.dumps({k: v for k, v in json.loads(meta["config"]).items() if k != "down_channels"})
    save_file(tensors, str(tmp_path / "old.safetensors"), meta)
    with pytest.raises(
        ValueError,
        match=r"format 1, this diffusion-oft reads format 2 .*retrain with `diffusion-oft "
        r"train control`",
    ):
        load_condition_encoder(tmp_path / "old.safetensors")


def test_slim_encoder_widths_round_trip_and_zero_init(tmp_path):
    """The slim design is a config (widths, 1x1 heads, separable downsamplers), not a new format: it
    round-trips through the file, starts as the base model, and a format-2 file from before these
    fields existed still loads as the hint design."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from diffusion_oft.control import encoder_design_kwargs, load_condition_encoder, save_condition_encoder

    unet = tiny_unet().eval()
    slim, hint = condition_encoder_for(unet, 2, design="slim"), condition_encoder_for(unet, 2)
    assert slim.config.block_out_channels == (8, 16) and slim.config.head_kernel_size == 1
    assert slim.config.separable_downs and slim.downs[0][0].groups == 16  # depthwise 3x3, then 1x1
    n_slim, n_hint = (sum(p.numel() for p in e.parameters()) for e in (slim, hint))
    assert n_slim < n_hint / 4
    g = torch.Generator().manual_seed(2)
    sample, text, cond = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 5, 32, generator=g),
        torch.rand(1, 3, 16, 16, generator=g),
    )
    with torch.no_grad():
        assert torch.equal(unet(sample, 10, text).sample, ControlledUNet(unet, slim)(sample, 10, text, cond).sample)
        for p in slim.parameters():
            p.normal_(0, 0.1)
        moved = ControlledUNet(unet, slim)(sample, 10, text, cond).sample
    assert not torch.allclose(moved, unet(sample, 10, text).sample)
    path = save_condition_encoder(slim, tmp_path / "slim.safetensors")
    loaded, meta = load_condition_encoder(path)
    assert meta["format_version"] == "2"
    assert {k: loaded.config[k] for k in ("block_out_channels", "head_kernel_size", "separable_downs")} == {
        "block_out_channels": (8, 16),
        "head_kernel_size": 1,
        "separable_downs": True,
    }
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(slim(cond), loaded(cond), strict=True))
    # a format-2 file written before head_kernel_size / separable_downs existed: the hint design
    hint_path = save_condition_encoder(hint, tmp_path / "hint.safetensors")
    with safe_open(str(hint_path), framework="pt") as f:
        old_meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(old_meta["config"])
    del config["head_kernel_size"], config["separable_downs"]
    save_file(tensors, str(tmp_path / "older.safetensors"), {**old_meta, "config": json.dumps(config)})
    older, _ = load_condition_encoder(tmp_path / "older.safetensors")
    assert older.config.head_kernel_size == 3 and not older.config.separable_downs
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(hint(cond), older(cond), strict=True))
    with pytest.raises(ValueError, match="unknown control encoder 'wide'; choose one of hint, slim"):
        encoder_design_kwargs("wide", 8)
    with pytest.raises(ValueError, match="head_kernel_size must be 1 or 3"):
        ConditionEncoder(out_channels=32, downscale_factor=2, head_kernel_size=5)


# ---- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    model = save_tiny_sd(root / "tiny-sd")
    data = make_control_folder(root / "data")
    flags = [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--resolution",
        str(RES),
        "--max_train_steps",
        "20",
        "--learning_rate",
        "1e-2",
        "--encoder_learning_rate",
        "1e-2",
        "--checkpointing_steps",
        "10",
        "--validation_prompt",
        "a yellow circle",
        "--validation_image",
        str(data / "cond_0.png"),
        "--validation_steps",
        "10",
        "--num_inference_steps",
        "2",
        "--num_validation_images",
        "1",
        "--report_to",
        "none",
        "--proportion_empty_prompts",
        "0.2",
        "--seed",
        "3",
    ]
    out = root / "run"
    result = train_main([*flags, "--output_dir", str(out)])
    return root, model, data, out, flags, result


@pytest.mark.slow  # end to end: control training
def test_control_training_outputs_and_pipeline(control_run):
    from diffusion_oft.pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

    root, model, data, out, _, result = control_run
    assert result["global_step"] == 20
    for name in (
        "adapter.safetensors",
        "condition_encoder.safetensors",
        "samples.png",
        "README.md",
        "checkpoint-10/condition_encoder.safetensors",
        "validation/validation-000010.png",
    ):
        assert (out / name).is_file(), name
    enc = read_tensors(out / "condition_encoder.safetensors")
    assert enc["conv_out.weight"].abs().sum() > 0 and enc["heads.0.weight"].abs().sum() > 0  # zero convs learned
    pipe = OrthoStableDiffusionControlPipeline.from_pretrained(model, control=out)
    pipe.set_progress_bar_config(disable=True)
    cond = Image.open(data / "cond_1.png")
    kw = dict(num_inference_steps=3, output_type="np", height=RES, width=RES)
    with_cond = pipe("a yellow square", image=cond, generator=torch.Generator().manual_seed(0), **kw).images
    without = pipe("a yellow square", generator=torch.Generator().manual_seed(0), **kw).images
    off = pipe(
        "a yellow square", image=cond, control_scale=0.0, generator=torch.Generator().manual_seed(0), **kw
    ).images
    assert np.abs(with_cond - without).mean() > 1e-4
    assert np.array_equal(off, without)  # scale 0 = the base model, bit for bit
    window = pipe(
        "a yellow square", image=cond, control_guidance_end=0.5, generator=torch.Generator().manual_seed(0), **kw
    ).images
    assert np.abs(window - with_cond).mean() > 0 and np.abs(window - without).mean() > 0


@pytest.mark.slow  # end to end: control training
def test_control_resume_is_bit_exact(control_run):
    root, model, data, out, flags, _ = control_run
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-10", resumed / "checkpoint-10")
    train_main([*flags, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    for name in ("adapter.safetensors", "condition_encoder.safetensors"):
        a, b = read_tensors(out / name), read_tensors(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.slow  # end to end: control training
def test_custom_pipeline_file_and_eval_control(control_run, capsys):
    from diffusers import DiffusionPipeline

    root, model, data, out, _, _ = control_run
    pipe = DiffusionPipeline.from_pretrained(
        model,
        custom_pipeline=str(REPO / "pipelines" / "stable_diffusion_oft_control.py"),
        trust_remote_code=True,
        control=str(out),
    )
    assert type(pipe).__name__ == "OrthoStableDiffusionControlPipeline" and pipe.condition_encoder is not None
    code = cli_main(
        [
            "eval",
            "control",
            "--pretrained_model_name_or_path",
            str(model),
            "--control",
            str(out),
            "--data_dir",
            str(data),
            "--resolution",
            str(RES),
            "--num_inference_steps",
            "2",
            "--max_samples",
            "2",
            "--output_dir",
            str(root / "eval"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "edge IoU" in printed and "with the condition" in printed
    summary = json.loads((root / "eval" / "control_eval.json").read_text())["summary"]
    assert 0.0 <= summary["controlled"]["f1"] <= 1.0 and "no_control" in summary
    assert (root / "eval" / "control_eval.png").is_file()


@pytest.mark.slow  # end to end: control training
def test_datasets_dataset_with_canny_on_the_fly(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = save_tiny_sd(tmp_path / "tiny-sd")
    images, texts = zip(*(shape_image(i) for i in range(4)), strict=True)
    ds = datasets.Dataset.from_dict(
        {"image": list(images), "text": list(texts)},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    result = train_main(
        [
            "--pretrained_model_name_or_path",
            str(model),
            "--dataset_name",
            str(tmp_path / "ds"),
            "--condition",
            "canny",
            "--resolution",
            str(RES),
            "--max_train_steps",
            "3",
            "--method",
            "ether",
            "--num_blocks",
            "2",
            "--report_to",
            "none",
            "--num_inference_steps",
            "2",
            "--num_validation_images",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    assert result["global_step"] == 3
    info = do.adapter_info(out / "adapter.safetensors")
    assert "ff.net.2" in info["components"]["unet"]["config"]["extra_target_modules"]  # ETHER control: FF too
    assert (out / "samples.png").is_file()


@pytest.mark.slow  # end to end: control training
def test_controlnet_mode(tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from diffusion_oft.training.control import load_controlnet_extras

    model = save_tiny_sd(tmp_path / "tiny-sd")
    data = make_control_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    train_main(
        [
            "--pretrained_model_name_or_path",
            str(model),
            "--train_data_dir",
            str(data),
            "--resolution",
            str(RES),
            "--control_mode",
            "controlnet",
            "--block_size",
            "8",
            "--max_train_steps",
            "3",
            "--learning_rate",
            "1e-2",
            "--encoder_learning_rate",
            "1e-2",
            "--report_to",
            "none",
            "--num_inference_steps",
            "2",
            "--num_validation_images",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    assert list(do.adapter_info(out / "adapter.safetensors")["components"]) == ["controlnet"]
    base = StableDiffusionControlNetPipeline.from_pretrained(
        model,
        controlnet=ControlNetModel.from_unet(
            __import__("diffusers").UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
            conditioning_embedding_out_channels=(16, 32),
        ),
        safety_checker=None,
        requires_safety_checker=False,
    )
    base.set_progress_bar_config(disable=True)
    load_controlnet_extras(base.controlnet, out / "controlnet_extras.safetensors")
    do.load_adapter(base, out / "adapter.safetensors")
    image = base(
        "a yellow circle",
        image=Image.open(data / "cond_0.png"),
        num_inference_steps=2,
        height=RES,
        width=RES,
        output_type="np",
    ).images
    assert np.isfinite(image).all()


@pytest.mark.slow  # end to end: control training
def test_train_control_slim_encoder(tmp_path):
    """--control_encoder slim trains the slim design and writes it with its widths; the pipeline loads it."""
    from diffusion_oft.control import load_paired_encoder
    from diffusion_oft.pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

    model = save_tiny_sd(tmp_path / "tiny-sd")
    data = make_control_folder(tmp_path / "data", n=2)
    out = tmp_path / "out"
    train_main(
        [
            "--pretrained_model_name_or_path",
            str(model),
            "--train_data_dir",
            str(data),
            "--resolution",
            str(RES),
            "--control_encoder",
            "slim",
            "--block_size",
            "8",
            "--max_train_steps",
            "2",
            "--learning_rate",
            "1e-2",
            "--encoder_learning_rate",
            "1e-2",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    enc = load_paired_encoder(out)
    assert enc.config.block_out_channels == (8, 16) and enc.config.separable_downs
    assert enc.config.head_kernel_size == 1
    assert any(p.abs().sum() > 0 for p in enc.heads.parameters())  # the zero heads moved
    pipe = OrthoStableDiffusionControlPipeline.from_pretrained(
        model, control=str(out), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a yellow circle",
        image=Image.open(data / "cond_0.png"),
        num_inference_steps=2,
        height=RES,
        width=RES,
        output_type="np",
    ).images
    assert np.isfinite(image).all()


def test_control_user_errors(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert (
        cli_main(["train", "control", "--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path / "d")])
        == 2
    )
    assert "no metadata.jsonl" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli_main(["train", "control", "--pretrained_model_name_or_path", "x"]) == 2
    assert "give --train_data_dir" in capsys.readouterr().err


# ---- the control recipe: timesteps, loss space, toy-world scores -------------------------------------
def test_cubic_timesteps_and_v_space_loss():
    from diffusers import DDPMScheduler

    from diffusion_oft.training.loss import diffusion_loss, sample_timesteps

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, sched, g, "cpu", "cubic")
    assert t.min() >= 0 and t.max() <= 999
    assert abs((t >= 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.01  # P(u^3 <= 1/2) = 0.794
    assert torch.equal(
        sample_timesteps(8, sched, torch.Generator().manual_seed(1), "cpu"),
        torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1)),
    )  # uniform as before
    with pytest.raises(ValueError, match="unknown timestep bias"):
        sample_timesteps(2, sched, g, "cpu", "cosine")
    # v-space loss of an epsilon model = MSE between the v's the predictions imply and the true v
    x0, noise, eps_hat = (
        torch.randn(4, 4, 8, 8, generator=g),
        torch.randn(4, 4, 8, 8, generator=g),
        torch.randn(4, 4, 8, 8, generator=g),
    )
    t = torch.tensor([0, 300, 700, 999])
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    v_true, v_hat = ab.sqrt() * noise - (1 - ab).sqrt() * x0, ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat
    loss, _ = diffusion_loss(eps_hat, noise, t, sched, loss_space="v")
    assert torch.allclose(loss, ((v_hat - v_true) ** 2).mean(), rtol=1e-4)  # float32 round-off of x0_hat
    with pytest.raises(ValueError, match="not both"):
        diffusion_loss(eps_hat, noise, t, sched, snr_gamma=5.0, loss_space="v")


def test_toyworld_control_scores():
    from diffusion_oft.toyworld import world
    from diffusion_oft.toyworld.evaluate import _score_control, control_eval_examples, hand_drawn_examples
    from diffusion_oft.toyworld.judge import box_iou

    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou(None, (0, 0, 1, 1)) == 0.0
    hand = hand_drawn_examples(6)
    assert [s.shape for _, _, s in hand] == ["square", "circle", "triangle"] * 2
    for cond, caption, scene in hand:  # plain outlines: white pixels on the scene's box border
        edges = np.asarray(cond.convert("L")) > 127
        ys, xs = np.nonzero(edges)
        assert box_iou((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), scene.bbox()) > 0.9
        assert scene.shape in caption and scene.colour in caption
    held = control_eval_examples(4)
    perfect = _score_control([world.render(s) for _, _, s in held], held)
    assert perfect["followed"] == 1.0 and perfect["colour_kept"] == 1.0 and perfect["edge_f1"] > 0.9
    shifted = [world.render(world.Scene(s.shape, s.colour, s.background, s.size // 2, 12, 12)) for _, _, s in held]
    assert _score_control(shifted, held)["box_iou"] < perfect["box_iou"]


@pytest.mark.slow  # the toy world
def test_toyworld_loop_trains_controlnet_references(tmp_path):
    """The benchmark loop's ControlNet references: every parameter trained (full ControlNet) or the
    adapter + hint encoder/zero convs (controlnet mode); ControlNetPipe judges them like the control
    pipeline, and at control scale 0 gives the base model's images."""
    from diffusers import ControlNetModel

    from diffusion_oft.control import default_channels
    from diffusion_oft.toyworld.finetune import AdapterSpec, ControlNetPipe, load_toy_pipeline, train
    from diffusion_oft.training.control import CONTROLNET_TRAINED_PARTS

    pipe = load_toy_pipeline(save_tiny_sd(tmp_path / "tiny-sd"), control=True)
    g = torch.Generator().manual_seed(0)
    latents, text, conds = (
        torch.randn(4, 4, 8, 8, generator=g),
        torch.randn(4, 5, 32, generator=g),
        torch.rand(4, 3, 16, 16, generator=g),
    )
    full = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=default_channels(2))
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    seen = []
    info = train(
        pipe,
        None,
        latents,
        text,
        steps=2,
        lr=1e-3,
        conditions=conds,
        controlnet=full,
        max_grad_norm=1e-3,
        on_step=seen.append,
    )
    assert seen == [1, 2]  # on_step after each optimiser step
    median, largest, clipped = info["grad_norm"]  # norms before clipping; at 1e-3 every step is clipped
    assert 1e-3 < median <= largest and clipped == 1.0
    assert info["params"] == sum(p.numel() for p in full.parameters())
    assert not torch.equal(
        before["down_blocks.0.attentions.0.proj_in.weight"], full.down_blocks[0].attentions[0].proj_in.weight
    )  # the copy itself trains
    copy = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=default_channels(2))
    info = train(
        pipe,
        AdapterSpec("OFT", do.AdapterConfig(method="oft", block_size=8)),
        latents,
        text,
        steps=2,
        lr=1e-3,
        conditions=conds,
        controlnet=copy,
    )
    extras = sum(p.numel() for part in CONTROLNET_TRAINED_PARTS for p in getattr(copy, part).parameters())
    assert info["params"] == info["adapter_params"] + extras and 0 < info["adapter_params"]
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters())  # the UNet stays frozen
    judged = ControlNetPipe(pipe, full)
    kw = dict(num_inference_steps=2, guidance_scale=4.0, height=RES, width=RES, output_type="np")
    cond = Image.new("RGB", (RES, RES))
    off = judged(["a circle"], image=[cond], control_scale=0.0, generator=torch.Generator().manual_seed(1), **kw)
    plain = pipe(["a circle"], generator=torch.Generator().manual_seed(1), **kw)
    np.testing.assert_allclose(off.images, plain.images, atol=1e-6)
