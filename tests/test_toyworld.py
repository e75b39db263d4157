"""The toy world: generator, judge, tokenizer, shipped datasets and the shipped pretrained model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_oft.toyworld import judge, world
from diffusion_oft.toyworld.components import RARE_TOKENS, WORDS, make_tokenizer
from diffusion_oft.toyworld.datasets import SUBJECT_PROMPT, write_control_dataset, write_subject_dataset

pytestmark = pytest.mark.slow  # the toy world

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOY_SD = ASSETS / "toy-sd"
MAIN_JOB_STEPS, MAIN_JOB_LR = 60, 1e-3  # a shortened README main job (README, Quick start: 400 steps at 3e-4)


def test_judge_reads_every_rendered_scene_exactly():
    rng = random.Random(123)
    scenes = [world.sample_scene(rng) for _ in range(300)]
    readings = [judge.read_image(world.render(s)) for s in scenes]
    wrong = [
        (s, r.shape, r.colour, r.background)
        for s, r in zip(scenes, readings, strict=True)
        if (r.shape, r.colour, r.background) != (s.shape, s.colour, s.background)
    ]
    assert not wrong, wrong[:3]
    targets = [(s.shape, s.colour, s.background) for s in scenes]
    assert judge.judge_in_world([world.render(s) for s in scenes[:20]], targets[:20])["in_world"] == 1.0


def test_judge_tells_wrong_shape_colour_and_background_apart():
    scene = world.Scene("circle", "red", "white", 30, 32, 32)
    image = world.render(scene)
    assert judge.judge_in_world([image], [("square", "red", "white")])["in_world"] == 0.0
    assert judge.judge_in_world([image], [("circle", "blue", "white")])["in_world"] == 0.0
    assert judge.judge_in_world([image], [("circle", "red", "black")])["background"] == 0.0
    blank = Image.new("RGB", (64, 64), world.PALETTE["gray"])
    assert judge.read_image(blank).shape is None
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert judge.judge_in_world([noise], [("circle", "red", "white")])["in_world"] == 0.0


def test_subject_fidelity_separates_the_subject_from_in_world_objects():
    rng = random.Random(5)
    subjects = [world.subject_scene(rng, background=b) for b in ("white", "black", "gray", "checkered")]
    objects = [world.sample_scene(rng) for _ in range(12)]
    on_subject = judge.judge_subject([world.render(s) for s in subjects], [s.background for s in subjects])
    on_objects = judge.judge_subject([world.render(s) for s in objects], [s.background for s in objects])
    assert on_subject["subject_fidelity"] > 0.9 and on_subject["is_star"] == 1.0
    assert on_subject["prompt_fidelity"] == 1.0
    assert on_objects["subject_fidelity"] < 0.45 and on_objects["is_star"] == 0.0
    assert on_subject["is_striped"] == 1.0 and on_subject["is_subject"] == 1.0
    assert on_objects["is_striped"] == 0.0 and on_objects["is_subject"] == 0.0


def test_decoder_stage_images_never_show_the_subject():
    rng = random.Random(3)
    scenes = [world.sample_codec_scene(rng) for _ in range(2000)]
    assert {s.shape for s in scenes} == set(world.ALL_SHAPES) and all(s.colour == "striped" for s in scenes)
    assert not any(world.is_subject(s) for s in scenes)
    assert all(s.background not in s.stripes for s in scenes)


def test_tokenizer_has_whole_word_tokens_and_unused_rare_tokens(tmp_path):
    from transformers import AutoTokenizer, CLIPTokenizer

    make_tokenizer(tmp_path)  # vocab.json + merges.txt, then saved as the pipeline folder has it
    for tok in (CLIPTokenizer.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))):
        for word in WORDS:
            assert tok.tokenize(word) == [word + "</w>"], word
        assert tok.tokenize("a zebra") == ["a</w>"] + tok.tokenize("zebra")  # unknown words: characters
    from diffusion_oft.toyworld.pretrain import render_dataset

    _, captions = render_dataset(500, seed=0)
    used = {w for c in captions for w in c.split()}
    assert not used & set(RARE_TOKENS)


def test_shipped_datasets_are_reproducible_from_their_seeds(tmp_path):
    written = write_subject_dataset(tmp_path / "subject")
    shipped = sorted((ASSETS / "subject").glob("*.png"))
    assert [p.name for p in written] == [p.name for p in shipped]
    for a, b in zip(written, shipped, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert a.with_suffix(".txt").read_text() == b.with_suffix(".txt").read_text()
    captions = [p.with_suffix(".txt").read_text().strip() for p in shipped]
    assert captions[0] == SUBJECT_PROMPT and len(set(captions)) == len(shipped)  # one background per photo
    assert all(c.startswith("a sks toy on a ") for c in captions)
    assert {"black", "checkered", "green"}.isdisjoint(c.split()[-2] for c in captions)  # judged, never shown
    write_control_dataset(tmp_path / "control")
    assert (tmp_path / "control" / "metadata.jsonl").read_text() == (ASSETS / "control" / "metadata.jsonl").read_text()
    row = json.loads((ASSETS / "control" / "metadata.jsonl").read_text().splitlines()[7])
    for key in ("image", "conditioning_image"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "control" / row[key])),
            np.asarray(Image.open(ASSETS / "control" / row[key])),
        )
    assert SUBJECT_PROMPT == "a sks toy on a white background"


def test_stage_two_widens_the_vocabulary_but_never_shows_the_subject():
    rng = random.Random(7)
    scenes = [world.sample_extended_scene(rng) for _ in range(3000)]
    striped = [s for s in scenes if s.colour == "striped"]
    assert striped and {s.shape for s in scenes} == set(world.ALL_SHAPES)
    assert {s.colour for s in scenes} >= set(world.EXTRA_COLOURS)
    assert not any(world.is_subject(s) for s in scenes)
    assert all(s.shape != world.SUBJECT_SHAPE for s in striped)  # stars are always plain
    assert all(set(s.stripes) != set(world.SUBJECT_COLOURS) for s in striped)
    assert all(f"{s.stripes[0]} and {s.stripes[1]} striped {s.shape}" in world.caption(s) for s in striped)
    assert not any(world.SUBJECT_TOKEN in world.caption(s).split() for s in scenes)
    plain = [s for s in scenes if s.colour != "striped"][:200]
    readings = [judge.read_image(world.render(s)) for s in plain]  # the judge reads the new vocabulary too
    assert all(
        (r.shape, r.colour, r.background) == (s.shape, s.colour, s.background)
        for s, r in zip(plain, readings, strict=True)
    )


def test_pretraining_script_runs_resumes_and_writes_a_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusion_oft.toyworld.pretrain import pretrain

    kwargs = dict(
        dataset_size=16,
        vae_steps=2,
        vae_batch_size=2,
        batch_size=2,
        lr=1e-4,
        judge_seeds=(0,),
        judge_steps=2,
        save_every=2,
    )
    vae_phase = pretrain(tmp_path / "a", unet_steps=4, vae_only=True, **kwargs)  # stops after the VAE
    assert (tmp_path / "a" / ".pretrain-vae.pt").is_file() and not (tmp_path / "a" / "unet").exists()
    assert set(vae_phase) == {"vae_seconds", "scaling_factor", "vae_subject_reconstruction"}
    with pytest.raises(KeyboardInterrupt):  # interrupted after the step-2 state was written
        pretrain(tmp_path / "a", unet_steps=4, stop_after=3, **kwargs)
    assert (tmp_path / "a" / ".pretrain-state.pt").is_file()
    resumed = pretrain(tmp_path / "a", unet_steps=4, **kwargs)
    pretrain(tmp_path / "b", unet_steps=4, **kwargs)
    assert resumed["resumed_at"] == 2
    a = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a"))
    b = StableDiffusionPipeline.from_pretrained(str(tmp_path / "b"))
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters(), strict=True):
        assert torch.equal(pa, pb)  # resuming is bit-exact
    assert not (tmp_path / "a" / ".pretrain-state.pt").exists()

    from diffusion_oft.toyworld.pretrain import extend

    report = extend(tmp_path / "a", steps=2, dataset_size=8, batch_size=2, judge_seeds=(0,), judge_steps=2)
    assert report["stage2"]["steps"] == 2 and "judge_extended" in report["stage2"]
    assert json.loads((tmp_path / "a" / "pretraining.json").read_text())["stage2"]["steps"] == 2
    a2 = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a"))
    assert any(not torch.equal(p1, p2) for p1, p2 in zip(a.unet.parameters(), a2.unet.parameters(), strict=True))
    with pytest.raises(ValueError, match="stage 2 already"):
        extend(tmp_path / "a", steps=2, dataset_size=8, batch_size=2)

    from diffusion_oft.toyworld.pretrain import refine_decoder

    report = refine_decoder(tmp_path / "a", steps=2, dataset_size=8, batch_size=2, judge_seeds=())
    assert report["decoder"]["steps"] == 2
    a3 = StableDiffusionPipeline.from_pretrained(str(tmp_path / "a"))
    old_vae, new_vae = dict(a2.vae.named_parameters()), dict(a3.vae.named_parameters())
    frozen = [k for k in old_vae if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(old_vae[k], new_vae[k]) for k in frozen)  # same latent space
    assert any(not torch.equal(old_vae[k], new_vae[k]) for k in old_vae if k.startswith("decoder."))
    with pytest.raises(ValueError, match="decoder stage already"):
        refine_decoder(tmp_path / "a", steps=2, dataset_size=8, batch_size=2, judge_seeds=())


needs_model = pytest.mark.skipif(not (TOY_SD / "model_index.json").is_file(), reason="assets/toy-sd not built")


@needs_model
def test_shipped_model_loads_offline_and_draws_the_world():
    from diffusers import StableDiffusionPipeline

    from diffusion_oft.toyworld.pretrain import judge_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_SD), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.tokenize("sks") == ["sks</w>"]
    scores, _, _ = judge_pipeline(pipe, seeds=(0,))
    assert scores["in_world"] >= 0.75, scores  # 12 prompts, one seed; the two-seed figure is in pretraining.json
    report = json.loads((TOY_SD / "pretraining.json").read_text())
    assert report["judge"]["in_world"] >= 0.8 and report["stage1_judge"]["in_world"] >= 0.8
    assert report["stage2"]["steps"] > 0  # the shipped model has the widened vocabulary


@needs_model
def test_dreambooth_on_the_toy_model_reports_the_judge_and_keeps_the_world(tmp_path):
    """A shortened README main job (prior preservation with the captioned assets/prior images): the
    judge's figures are written for base model and adapter, and in-world prompts keep working.
    (How far the star is learnt is the README main job's figure, 400 steps at 3e-4; 60 at 1e-3 here.)"""
    from diffusion_oft.toyworld.evaluate import judge_adapter
    from diffusion_oft.training.dreambooth import main as train_main

    out = tmp_path / "run"
    summary = train_main(
        [
            "--pretrained_model_name_or_path",
            str(TOY_SD),
            "--instance_data_dir",
            str(ASSETS / "subject"),
            "--instance_prompt",
            SUBJECT_PROMPT,
            "--with_prior_preservation",
            "--class_data_dir",
            str(ASSETS / "prior"),
            "--num_class_images",
            "24",
            "--resolution",
            "64",
            "--output_dir",
            str(out),
            "--max_train_steps",
            str(MAIN_JOB_STEPS),
            "--learning_rate",
            str(MAIN_JOB_LR),
            "--train_batch_size",
            "4",
            "--block_size",
            "32",
            "--validation_steps",
            "100000",
            "--report_to",
            "none",
            "--judge",
            "toyworld",
        ],
        judge=judge_adapter,
    )
    scores = json.loads((out / "judge.json").read_text())
    assert scores == summary["judge"]
    base, adapted = scores["base model"], scores["with the adapter"]
    assert base["prior_preservation"] >= 0.8 and base["subject_fidelity"] < 0.4, scores
    assert adapted["prior_preservation"] >= base["prior_preservation"] - 0.2, scores
    assert adapted != base  # the adapter changed the images
    assert (out / "judge.png").is_file() and "subject fidelity" in (out / "judge.md").read_text()


def test_judge_flag_needs_64_pixel_images(tmp_path):
    from diffusion_oft.training.dreambooth import main as train_main

    with pytest.raises(ValueError, match="--resolution 64"):
        train_main(
            [
                "--pretrained_model_name_or_path",
                str(TOY_SD),
                "--instance_data_dir",
                str(ASSETS / "subject"),
                "--instance_prompt",
                SUBJECT_PROMPT,
                "--resolution",
                "32",
                "--output_dir",
                str(tmp_path / "o"),
                "--judge",
                "toyworld",
            ]
        )


def test_captioned_class_images_replace_the_class_prompt(tmp_path):
    """assets/prior: in-world images with <name>.txt captions regenerate from their seed, and serve as
    prior-preservation images without --class_prompt (each image trains with its own caption)."""
    from diffusion_oft.toyworld.datasets import write_prior_dataset
    from diffusion_oft.training.args import dreambooth_parser, finalize_args
    from diffusion_oft.training.data import DreamBoothDataset, collate_dreambooth, list_images

    written = write_prior_dataset(tmp_path / "prior")
    for path in written:
        shipped = ASSETS / "prior" / path.name
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shipped)))
        assert path.with_suffix(".txt").read_text() == shipped.with_suffix(".txt").read_text()
    common = [
        "--pretrained_model_name_or_path",
        "unused",
        "--instance_data_dir",
        str(ASSETS / "subject"),
        "--instance_prompt",
        SUBJECT_PROMPT,
        "--resolution",
        "64",
        "--output_dir",
        str(tmp_path / "o"),
        "--with_prior_preservation",
        "--num_class_images",
        "24",
    ]
    finalize_args(dreambooth_parser().parse_args(common + ["--class_data_dir", str(ASSETS / "prior")]))
    (tmp_path / "prior" / "prior_03.txt").unlink()  # one image without a caption: a class prompt is needed
    with pytest.raises(ValueError, match="--class_prompt"):
        finalize_args(dreambooth_parser().parse_args(common + ["--class_data_dir", str(tmp_path / "prior")]))
    data = DreamBoothDataset(list_images(ASSETS / "subject", "x"), 64, True, 0, list_images(ASSETS / "prior", "x"))
    batch = collate_dreambooth([data[(i, 0)] for i in range(3)])
    assert batch["num_instance"] == 3 and batch["pixel_values"].shape[0] == 6
    assert batch["class_captions"] == [(ASSETS / "prior" / f"prior_{i:02d}.txt").read_text().strip() for i in range(3)]


def test_captioned_instance_images_train_with_their_own_caption(tmp_path):
    """An instance image with <name>.txt is trained with that caption; one without, with --instance_prompt."""
    import shutil

    from diffusion_oft.training.data import DreamBoothDataset, collate_dreambooth, list_images

    folder = tmp_path / "subject"
    shutil.copytree(ASSETS / "subject", folder)
    (folder / "sks_1.txt").unlink()
    data = DreamBoothDataset(list_images(folder, "x"), 64, True, 0)
    batch = collate_dreambooth([data[(i, 0)] for i in range(3)])
    assert batch["instance_captions"] == [SUBJECT_PROMPT, None, "a sks toy on a red background"]


def test_pretraining_with_a_wider_codec_and_an_8_channel_latent(tmp_path):
    """The autoencoder options of the pretraining script: block widths, latent channels (the UNet follows),
    the codec dataset, the initial posterior log-variance, the image-gradient loss, EQ-VAE steps, the
    per-channel standardisation and the signal scale."""
    from diffusers import StableDiffusionPipeline

    from diffusion_oft.toyworld import components
    from diffusion_oft.toyworld.pretrain import pretrain

    vae = components.make_vae((8, 16, 16), latent_channels=8, logvar_init=-6.0)
    assert torch.equal(vae.quant_conv.bias[8:], torch.full((8,), -6.0))
    report = pretrain(
        tmp_path / "m",
        dataset_size=8,
        vae_steps=2,
        vae_batch_size=2,
        unet_steps=2,
        batch_size=2,
        lr=1e-4,
        judge_seeds=(0,),
        judge_steps=2,
        vae_channels=(8, 16, 16),
        latent_channels=8,
        vae_data="codec",
        vae_lr=2e-4,
        vae_logvar_init=-6.0,
        vae_gradient_weight=1.0,
        vae_equivariance=0.5,
        vae_standardise=True,
        latent_signal_scale=0.7,
    )
    assert (report["latent_channels"], report["vae_data"], report["vae_lr"]) == (8, "codec", 2e-4)
    assert report["vae_equivariance"] == 0.5 and report["vae_standardise"]
    # standardised: every channel of the scenes' latent at unit spread, so the scaling factor is the signal scale
    assert report["scaling_factor"] == pytest.approx(0.7, rel=1e-2)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert pipe.vae.config.latent_channels == 8 and pipe.unet.config.in_channels == 8
    assert list(pipe.vae.config.block_out_channels) == [8, 16, 16]
    with pytest.raises(ValueError, match="vae_data"):
        pretrain(tmp_path / "n", dataset_size=4, vae_data="photos")
    with pytest.raises(ValueError, match="latent_signal_scale"):
        pretrain(tmp_path / "n", dataset_size=4, latent_signal_scale=0.0)
    with pytest.raises(ValueError, match="vae_equivariance"):
        pretrain(tmp_path / "n", dataset_size=4, vae_equivariance=1.5)
    assert not (tmp_path / "n").exists()  # validated before anything is written


def _bright_quadrant(t: torch.Tensor) -> int:
    """Which quadrant of a (B, C, H, W) tensor is brightest: 0 1 / 2 3."""
    half = t.shape[-1] // 2
    means = [t[..., i * half : (i + 1) * half, j * half : (j + 1) * half].mean() for i in (0, 1) for j in (0, 1)]
    return int(torch.stack(means).argmax())


def test_equivariant_pair_turns_and_downscales_latent_and_image_alike():
    """EQ-VAE's transform: the same quarter turn and scale for the latent and its image, the VAE's 4× kept."""
    from diffusion_oft.toyworld.pretrain_tools import equivariant_pair

    z = torch.zeros(2, 8, 16, 16)
    x = torch.zeros(2, 3, 64, 64)
    z[..., :8, :8] = 1.0  # the top-left quadrant marked in both
    x[..., :32, :32] = 1.0
    seen = set()
    for seed in range(12):
        zt, xt = equivariant_pair(z, x, torch.Generator().manual_seed(seed))
        h = zt.shape[-1]
        assert zt.shape == (2, 8, h, h) and xt.shape == (2, 3, 4 * h, 4 * h) and h in (8, 12)
        assert _bright_quadrant(zt) == _bright_quadrant(xt)
        seen.add((h, _bright_quadrant(zt)))
        again = equivariant_pair(z, x, torch.Generator().manual_seed(seed))
        assert torch.equal(again[0], zt) and torch.equal(again[1], xt)
    assert len(seen) >= 5  # several turns and both scales drawn
