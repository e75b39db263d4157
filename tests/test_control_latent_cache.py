"""The control trainer's VAE latent cache: same losses as encoding every step, resume, keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from training_helpers import read_tensors

from diffusion_oft.conditions import canny
from diffusion_oft.tiny import save_tiny_sd
from diffusion_oft.training.args import control_parser, finalize_args
from diffusion_oft.training.control import ControlTrainer

pytestmark = pytest.mark.slow  # end to end: training runs

RES = 16


def make_folder(folder: Path, n: int = 3, size: tuple[int, int] = (32, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", size, (30 + 40 * i, 30, 60))
        ImageDraw.Draw(img).rectangle([4 + 2 * i, 6, 20 + i, 24 - i], fill=(230, 200, 40))
        img.save(folder / f"img_{i}.png")
        canny(img).save(folder / f"cond_{i}.png")
        rows.append({"image": f"img_{i}.png", "conditioning_image": f"cond_{i}.png", "text": f"a yellow square {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_cache")
    return root, save_tiny_sd(root / "tiny-sd"), make_folder(root / "data")


def run(model: Path, data: Path, out: Path, *extra: str) -> tuple[ControlTrainer, dict]:
    argv = [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", str(RES),
        "--output_dir", str(out), "--report_to", "none", "--learning_rate", "1e-2", "--encoder_learning_rate",
        "1e-2", "--seed", "5", *extra,
    ]  # fmt: skip
    args = control_parser().parse_args(argv)
    finalize_args(args, "control")
    trainer = ControlTrainer(args)
    return trainer, trainer.run()


def losses(result: dict) -> list[float]:
    return [h["loss"] for h in result["history"]]


def same_files(a: Path, b: Path) -> None:
    for name in ("adapter.safetensors", "condition_encoder.safetensors"):
        ta, tb = read_tensors(a / name), read_tensors(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_cached_latents_give_bit_identical_losses_adapter_and_encoder(workspace, tmp_path):
    # batch 1: the cache encodes one image per VAE call, as the uncached step does, so the same kernels
    # see the same inputs and every number must match
    _, model, data = workspace
    flags = ("--train_batch_size", "1", "--max_train_steps", "8")
    cached, a = run(model, data, tmp_path / "cached", *flags)
    plain, b = run(model, data, tmp_path / "plain", *flags, "--no_cache_latents")
    assert cached.latent_cache is not None and cached.latent_cache.encoded == 3  # each image once
    assert plain.latent_cache is None
    assert losses(a) == losses(b)
    same_files(tmp_path / "cached", tmp_path / "plain")


def test_cached_latents_at_batch_two_match_encoding_every_step(workspace, tmp_path):
    # the cache encodes fixed chunks in folder order, the uncached step the shuffled batch: CPU
    # convolutions may differ in the last bits between batch shapes, hence a tolerance
    _, model, data = workspace
    flags = ("--train_batch_size", "2", "--max_train_steps", "6")
    cached, a = run(model, data, tmp_path / "cached", *flags, "--cache_latents")
    _, b = run(model, data, tmp_path / "plain", *flags, "--no_cache_latents")
    assert cached.latent_cache is not None and cached.latent_cache.encoded == 3
    assert losses(a) == pytest.approx(losses(b), rel=1e-5, abs=1e-7)


def test_resume_with_cached_latents_is_bit_exact(workspace, tmp_path):
    _, model, data = workspace
    flags = ("--train_batch_size", "2", "--max_train_steps", "10", "--checkpointing_steps", "5")
    _, full = run(model, data, tmp_path / "full", *flags)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-5", resumed / "checkpoint-5")
    trainer, rest = run(model, data, resumed, *flags, "--resume_from_checkpoint", "latest")
    assert trainer.latent_cache is not None and rest["history"][0]["step"] == 6
    assert losses(full)[5:] == losses(rest)
    same_files(tmp_path / "full", resumed)


def test_cache_keys_follow_the_image_files_and_the_resolution(workspace, tmp_path):
    _, model, _ = workspace
    data = make_folder(tmp_path / "data", n=2)
    trainer, _ = run(model, data, tmp_path / "a", "--max_train_steps", "1")
    cache, dataset = trainer.latent_cache, trainer.dataset
    first = cache.parameters([0, 1])
    assert cache.encoded == 2 and torch.equal(cache.parameters([1, 0]), first.flip(0))  # hits: no encode
    # an image rewritten with other pixels is encoded again at its next use; the other stays cached
    Image.new("RGB", (32, 32), (250, 10, 10)).save(data / "img_0.png")
    import os

    os.utime(data / "img_0.png", ns=(1, 10**18))
    again = cache.parameters([0, 1])
    assert cache.encoded == 3 and len(cache.entries) == 2
    assert not torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert cache.key(0) == (*dataset.fingerprint(0), RES, "square")
    # another resolution: other keys, other latents
    trainer32, _ = run(model, data, tmp_path / "b", "--max_train_steps", "1", "--resolution", "32")
    assert trainer32.latent_cache.key(0) != cache.key(0)
    assert trainer32.latent_cache.parameters([0]).shape[-1] == 2 * first.shape[-1]


def test_random_crops_of_non_square_images_are_not_cached(workspace, tmp_path):
    _, model, _ = workspace
    data = make_folder(tmp_path / "wide", n=2, size=(40, 32))
    trainer, _ = run(model, data, tmp_path / "random", "--max_train_steps", "2")
    assert trainer.latent_cache is None
    trainer, _ = run(model, data, tmp_path / "center", "--max_train_steps", "2", "--center_crop")
    assert trainer.latent_cache is not None


def test_datasets_rows_are_cached_by_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = save_tiny_sd(tmp_path / "tiny-sd")
    images = [Image.new("RGB", (32, 32), (40 * i, 90, 200)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    common = ("--dataset_name", str(tmp_path / "ds"), "--condition", "canny", "--max_train_steps", "3",
              "--train_batch_size", "1")  # fmt: skip
    argv = ["--pretrained_model_name_or_path", str(model), "--resolution", str(RES), "--report_to", "none",
            "--seed", "1", *common]  # fmt: skip
    results = []
    for name, extra in (("cached", ()), ("plain", ("--no_cache_latents",))):
        args = control_parser().parse_args([*argv, *extra, "--output_dir", str(tmp_path / name)])
        finalize_args(args, "control")
        trainer = ControlTrainer(args)
        results.append(trainer.run())
        assert (trainer.latent_cache is not None) == (name == "cached")
        if trainer.latent_cache is not None:
            assert trainer.latent_cache.encoded == 3 and trainer.latent_cache.key(2)[0] == "row 2"
    assert losses(results[0]) == losses(results[1])


def test_train_control_on_scenes_rendered_from_the_toy_world(workspace, tmp_path, capsys):
    from diffusion_oft.cli import main as cli_main

    _, model, data = workspace
    out = tmp_path / "run"
    argv = ["train", "control", "--pretrained_model_name_or_path", str(model), "--toyworld_scenes", "5",
            "--resolution", str(RES), "--max_train_steps", "2", "--report_to", "none",
            "--output_dir", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    rows = (out / "toyworld_data" / "metadata.jsonl").read_text().splitlines()
    first = (Path(__file__).resolve().parents[1] / "assets" / "control" / "metadata.jsonl").read_text().splitlines()
    assert rows == first[:5]  # seed 2000: assets/control's scenes first
    assert (out / "condition_encoder.safetensors").is_file()
    assert cli_main([*argv[:-2], "--output_dir", str(tmp_path / "x"), "--train_data_dir", str(data)]) != 0
    assert "--toyworld_scenes renders its own data" in capsys.readouterr().err
