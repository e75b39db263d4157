"""Unit tests of diffusion_oft.training: data order, crops, loss, checkpoints, arguments, grids."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from training_helpers import make_subject_images

from diffusion_oft.training import args as targs
from diffusion_oft.training.checkpoints import list_checkpoints, prune_checkpoints, resolve_checkpoint
from diffusion_oft.training.data import DreamBoothDataset, StreamBatchSampler, list_images, resize_and_crop
from diffusion_oft.training.loss import compute_snr, diffusion_loss, weighted_mse
from diffusion_oft.training.validation import image_grid


def test_stream_sampler_is_deterministic_sharded_and_resumable():
    full = StreamBatchSampler(5, batch_size=2, seed=3, num_batches=6)
    batches = list(full)
    assert batches == list(StreamBatchSampler(5, batch_size=2, seed=3, num_batches=6))
    # each epoch is a permutation of all examples
    flat = [k for b in batches for k in b]
    assert sorted(i for i, e in flat if e == 0) == list(range(5))
    assert sorted(i for i, e in flat if e == 1) == list(range(5))
    assert batches != list(StreamBatchSampler(5, batch_size=2, seed=4, num_batches=6))
    # resuming at batch 4 yields the same tail
    assert list(StreamBatchSampler(5, batch_size=2, seed=3, num_batches=2, start_batch=4)) == batches[4:]
    # two ranks split each global batch of 2 x 1 without overlap
    r0 = list(StreamBatchSampler(5, batch_size=1, seed=3, num_batches=6, num_replicas=2, rank=0))
    r1 = list(StreamBatchSampler(5, batch_size=1, seed=3, num_batches=6, num_replicas=2, rank=1))
    merged = [k for a, b in zip(r0, r1, strict=True) for k in (a[0], b[0])]
    assert merged == flat


def test_dataset_crops_depend_on_seed_epoch_index_only(tmp_path):
    images = list_images(make_subject_images(tmp_path / "s", n=2, size=24))
    ds = DreamBoothDataset(images, 16, center_crop=False, seed=0, class_images=images[:1])
    assert len(ds) == 2
    a, b = ds[(1, 0)], ds[(1, 0)]
    assert torch.equal(a["instance"]["pixels"], b["instance"]["pixels"])
    assert a["instance"]["pixels"].shape == (3, 16, 16) and "class" in a
    crops = {ds[(1, e)]["instance"]["crop_top_left"] for e in range(12)}
    assert len(crops) > 1  # random crops differ across epochs
    img = Image.new("RGB", (40, 20))
    crop, original, top_left = resize_and_crop(img, 16, True, None)
    assert crop.size == (16, 16) and original == (20, 40) and top_left == (0, 8)


def test_list_images_messages(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list_images(tmp_path / "d")
    assert list_images(tmp_path / "d", allow_empty=True) == []
    (tmp_path / "d" / ".DS_Store").write_text("x")  # hidden files are skipped
    (tmp_path / "d" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="a.jpg is not a readable image"):
        list_images(tmp_path / "d", strict=True)
    with pytest.warns(UserWarning, match="skipped 1 of 1"), pytest.raises(ValueError, match="no images it can read"):
        list_images(tmp_path / "d")


def test_loss_snr_weighting_and_prior_split():
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    t = torch.tensor([10, 200, 500, 990])
    plain = weighted_mse(pred, target, t, sched, None)
    assert torch.allclose(plain, torch.nn.functional.mse_loss(pred, target))
    snr = compute_snr(sched, t)
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = (per * torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(weighted_mse(pred, target, t, sched, 5.0), expected)
    loss, logs = diffusion_loss(pred, target, t, sched, num_instance=2, prior_loss_weight=0.5)
    inst = ((pred[:2] - target[:2]) ** 2).mean()
    prior = ((pred[2:] - target[2:]) ** 2).mean()
    assert torch.allclose(loss, inst + 0.5 * prior)
    assert set(logs) == {"loss", "instance_loss", "prior_loss"}


def test_checkpoint_pruning_and_latest(tmp_path):
    assert resolve_checkpoint(tmp_path, "latest") is None
    from safetensors.torch import save_file

    for step in (5, 10, 100, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file({"x": torch.zeros(1)}, str(tmp_path / f"checkpoint-{step}" / "adapter.safetensors"))
        for name in ("optimizer.safetensors", "training_state.json"):  # a complete checkpoint's files
            (tmp_path / f"checkpoint-{step}" / name).write_bytes(b"x")
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-5",
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-100",
    ]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-100"
    assert resolve_checkpoint(tmp_path, "checkpoint-10").name == "checkpoint-10"
    with pytest.raises(ValueError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-7")
    removed = prune_checkpoints(tmp_path, 2)  # room for one more: keep the newest 1
    assert [p.name for p in removed] == ["checkpoint-5", "checkpoint-10", "checkpoint-20"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-100"]


@pytest.mark.parametrize(
    "method, lr, structure",
    [
        ("oft", 6e-5, {"num_blocks": 4}),
        ("boft", 3e-5, {"num_blocks": 8, "n_butterfly_factors": 2}),
        ("ether", 6e-3, {"num_blocks": 4}),
        ("ether_plus", 6e-3, {"num_blocks": 4}),
    ],
)
def test_per_method_defaults(tmp_path, method, lr, structure):
    make_subject_images(tmp_path / "s", n=1)
    argv = [
        "--pretrained_model_name_or_path",
        "x",
        "--instance_data_dir",
        str(tmp_path / "s"),
        "--instance_prompt",
        "p",
        "--method",
        method,
    ]
    args = targs.finalize_args(targs.dreambooth_parser().parse_args(argv), "dreambooth")
    assert args.learning_rate == lr and args.max_train_steps >= 1000
    config = targs.adapter_config_from_args(args)
    assert config.method == method
    for key, value in structure.items():
        assert getattr(config, key) == value
    # an explicit block size replaces the default block count
    args = targs.finalize_args(targs.dreambooth_parser().parse_args([*argv, "--block_size", "16"]), "dreambooth")
    assert targs.adapter_config_from_args(args).block_size == 16
    te = targs.adapter_config_from_args(args, targets=targs.TEXT_ENCODER_TARGETS)
    assert te.target_modules == ("q_proj", "k_proj", "v_proj", "out_proj")


def test_image_grid_upscales_small_images():
    rows = [[Image.new("RGB", (16, 16), "red")] * 3, [Image.new("RGB", (16, 16), "blue")] * 2]
    grid = image_grid(rows, labels=["a", "b"])
    assert grid.width == 3 * 64 and grid.height == 2 * (64 + 14)
