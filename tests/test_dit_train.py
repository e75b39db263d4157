"""DreamBooth on SD3 and Flux (dev, schnell): the built-in tiny models, a few steps each (CPU, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from training_helpers import make_subject_images, read_tensors

import diffusion_oft as do
from diffusion_oft.inference import adapted_components
from diffusion_oft.model_paths import resolve_model_path
from diffusion_oft.tiny import tiny_flux_pipeline, tiny_sd3_pipeline
from diffusion_oft.training.args import dreambooth_parser, finalize_args
from diffusion_oft.training.dit import flow_matching_step
from diffusion_oft.training.dreambooth import main as train_main
from diffusion_oft.training.families import (
    FluxFamily,
    SD3Family,
    feed_forward_targets,
    flow_family,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)

RES = 32
PROMPT = "a photo of sks disc"
T5_LEN = 16  # short T5 prompts: fast


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("builtin-cache")
    mp.setenv("DIFFUSION_OFT_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_subject_images(tmp_path_factory.mktemp("subject") / "subject")


def args_for(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        model,
        "--instance_data_dir",
        str(data),
        "--instance_prompt",
        PROMPT,
        "--output_dir",
        str(out),
        "--resolution",
        str(RES),
        "--max_sequence_length",
        str(T5_LEN),
        "--num_inference_steps",
        "2",
        "--num_validation_images",
        "1",
        "--report_to",
        "none",
        *extra,
    ]


def render(pipe) -> torch.Tensor:
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=RES,
        width=RES,
        max_sequence_length=T5_LEN,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_family_is_detected_from_the_model_folder(builtin_cache, data, tmp_path):
    assert isinstance(flow_family("builtin:tiny-sd3"), SD3Family)
    assert isinstance(flow_family("builtin:tiny-flux"), FluxFamily)
    assert isinstance(flow_family("builtin:tiny-flux-schnell"), FluxFamily)
    assert flow_family("builtin:tiny-sd") is None  # Stable Diffusion: the UNet trainer
    folder = tmp_path / "my-flux"
    shutil.copytree(resolve_model_path("builtin:tiny-flux-schnell"), folder)
    assert isinstance(flow_family(str(folder)), FluxFamily)  # by model_index.json, not by name
    # per-family defaults of the shared flags (diffusers' DreamBooth scripts / pipelines)
    for model, family, scheme, guidance, t5 in (
        ("builtin:tiny-sd3", "sd3", "logit_normal", 7.0, 77),
        ("builtin:tiny-flux", "flux", "none", 3.5, 512),
        ("builtin:tiny-sd", None, None, 7.5, None),
    ):
        argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(data), "--instance_prompt", PROMPT]
        args = finalize_args(dreambooth_parser().parse_args(argv))
        assert (args.model_family, args.weighting_scheme, args.guidance_scale) == (family, scheme, guidance)
        assert args.max_sequence_length == t5
        if family is not None:  # the library's structure defaults for DiT widths (OFT b=32), not SD's n=4
            assert (args.block_size, args.num_blocks) == (None, None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train_text_encoder"], "--train_text_encoder is not supported for SD3 / Flux"),
        (["--snr_gamma", "5"], "use --weighting_scheme"),
        (["--attention", "self"], "choose layers with --target_modules"),
        (["--resolution", "30"], "--resolution must be divisible by 8"),
        (["--judge", "toyworld", "--resolution", "64"], "scores adapters of the toy world's SD model"),
    ],
)
def test_wrong_flags_for_dit_models_are_one_line_errors(builtin_cache, data, tmp_path, flags, message):
    argv = args_for("builtin:tiny-flux", data, tmp_path / "out", "--max_train_steps", "1", *flags)
    with pytest.raises(ValueError, match=message) as err:
        train_main(argv)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_resolution_must_split_into_the_transformers_patches():
    flux = tiny_flux_pipeline()
    flux.vae_scale_factor = 8  # as FLUX.1's VAE: latents of 520 px are 65 wide, not 2x2-packable
    with pytest.raises(
        ValueError,
        match=r"--resolution must be divisible by 16 for this FluxPipeline, got 520 "
        r"\(try 512 or 528\)",
    ):
        FluxFamily().check_resolution(flux, 520)
    FluxFamily().check_resolution(flux, 512)
    sd3 = tiny_sd3_pipeline()
    sd3.vae_scale_factor = 8  # patch 2: 16 px
    with pytest.raises(ValueError, match="divisible by 16 for this StableDiffusion3Pipeline"):
        SD3Family().check_resolution(sd3, 1000)


def test_train_feed_forward_needs_a_dit(builtin_cache, data, tmp_path):
    with pytest.raises(ValueError, match="--train_feed_forward is for SD3 / Flux"):
        train_main(args_for("builtin:tiny-sd", data, tmp_path / "o", "--train_feed_forward"))


@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("builtin:tiny-sd3", "oft"),
        ("builtin:tiny-sd3", "ether_plus"),
        ("builtin:tiny-flux", "oft"),
        ("builtin:tiny-flux", "ether_plus"),
        ("builtin:tiny-flux-schnell", "oft"),
        ("builtin:tiny-flux-schnell", "ether_plus"),
    ],
)
@pytest.mark.slow  # end to end: DiT training
def test_dreambooth_run_writes_an_adapter_that_changes_the_pipeline(builtin_cache, data, tmp_path, model, method):
    out = tmp_path / "run"
    lr = "1e-2" if method == "oft" else "3e-2"
    result = train_main(
        args_for(
            model,
            data,
            out,
            "--method",
            method,
            "--max_train_steps",
            "3",
            "--learning_rate",
            lr,
            "--center_crop",
            "--seed",
            "1",
        )
    )
    assert result["global_step"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert (out / "samples.png").is_file() and (out / "README.md").is_file()
    card = (out / "README.md").read_text()
    pipe_cls = "StableDiffusion3Pipeline" if "sd3" in model else "FluxPipeline"
    assert f"from diffusers import {pipe_cls}" in card and "| text encoder adapter | no |" in card
    meta = json.loads(do.files.read_adapter_file(out / "adapter.safetensors")[1]["training"])
    assert meta["model_family"] == ("sd3" if "sd3" in model else "flux")

    base = DiffusionPipeline.from_pretrained(resolve_model_path(model))
    base.set_progress_bar_config(disable=True)
    before = render(base)
    do.load_adapter(base, out / "adapter.safetensors")
    assert set(adapted_components(base)) == {"transformer"}
    layers = dict(do.model.named_ortho_layers(base.transformer))
    assert "transformer_blocks.0.attn.add_q_proj" in layers and "transformer_blocks.0.attn.to_add_out" in layers
    assert not any(".ff." in p or "proj_mlp" in p for p in layers)  # the feed-forward only on request
    after = render(base)
    assert (after - before).abs().max().item() > 1e-3


@pytest.mark.slow  # end to end: DiT training
def test_feed_forward_option_adds_the_mlps_and_flux_single_block_outputs(builtin_cache, data, tmp_path):
    out = tmp_path / "ff"
    train_main(
        args_for(
            "builtin:tiny-flux",
            data,
            out,
            "--max_train_steps",
            "1",
            "--train_feed_forward",
            "--num_validation_images",
            "0",
        )
    )
    paths = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in read_tensors(out / "adapter.safetensors")}
    paths = {p.rsplit(".default", 1)[0] for p in paths}
    expected = {
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.0.attn.to_q",
    }
    assert expected <= paths, sorted(paths)
    assert "proj_out" not in paths  # the transformer's final output projection stays frozen
    assert feed_forward_targets(tiny_flux_pipeline().transformer)[-1] == "single_transformer_blocks.0.proj_out"


@pytest.mark.slow  # interruption: resume
@pytest.mark.parametrize("model", ["builtin:tiny-sd3", "builtin:tiny-flux"])
def test_resume_is_bit_exact(builtin_cache, data, tmp_path, model):
    """4 steps in one go == 2 steps, stop, resume from checkpoint-2, 2 more (prior preservation on)."""
    flags = [
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--with_prior_preservation",
        "--class_prompt",
        "a photo of a disc",
        "--num_class_images",
        "2",
        "--class_data_dir",
        str(tmp_path / "class"),
        "--class_inference_steps",
        "2",
        "--weighting_scheme",
        "logit_normal",
        "--num_validation_images",
        "0",
    ]
    full = train_main(args_for(model, data, tmp_path / "full", *flags))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = train_main(args_for(model, data, resumed_dir, *flags, "--resume_from_checkpoint", "latest"))
    assert resumed["history"][0]["step"] == 3
    assert all({"instance_loss", "prior_loss"} <= set(h) for h in full["history"])
    a, b = read_tensors(tmp_path / "full" / "adapter.safetensors"), read_tensors(resumed_dir / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["loss"] for h in full["history"][2:]] == [h["loss"] for h in resumed["history"]]


# ---- the step itself: the formula, the Flux inputs --------------------------------------------------


def spy_forward(transformer) -> list[dict]:
    """Record every forward's keyword inputs and output of ``transformer``."""
    calls: list[dict] = []

    def hook(module, args, kwargs, output):
        calls.append({**kwargs, "output": output[0].detach().clone()})

    transformer.register_forward_hook(hook, with_kwargs=True)
    return calls


class StepArgs:
    weighting_scheme, logit_mean, logit_std, mode_scale = "sigma_sqrt", 0.0, 1.0, 1.29
    precondition_outputs, prior_loss_weight = 0, 0.5

    def __init__(self, **kw):
        self.__dict__.update(kw)


@pytest.mark.parametrize("arch", ["sd3", "flux-dev", "flux-schnell"])
@pytest.mark.parametrize("scheme", ["sigma_sqrt", "logit_normal", "cosmap"])
def test_flow_matching_step_against_the_formula(arch, scheme):
    pipe = tiny_sd3_pipeline() if arch == "sd3" else tiny_flux_pipeline(guidance_embeds=arch == "flux-dev")
    family = SD3Family() if arch == "sd3" else FluxFamily()
    calls = spy_forward(pipe.transformer)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 8, 8)  # scaled latents: 2 instance images + 1 class image
    cond = family.encode_prompts(pipe, ["a", "bb", "c"], T5_LEN, "cpu")
    args = StepArgs(weighting_scheme=scheme, guidance_scale=4.0)
    loss, logs = flow_matching_step(
        family, pipe.transformer, pipe.scheduler, x, cond, torch.Generator().manual_seed(5), args, num_instance=2
    )

    # the reference, from the formula: ε ~ N(0, 1) then u from the same generator; σ = sigmas[⌊u·N⌋]
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(x.shape, generator=g)
    if scheme == "logit_normal":  # sigmoid of N(logit_mean, logit_std²)
        u = torch.sigmoid(torch.normal(0.0, 1.0, (3,), generator=g))
    else:
        u = torch.rand(3, generator=g)
    n = pipe.scheduler.config.num_train_timesteps
    sigma = pipe.scheduler.sigmas[(u * n).long().clamp(0, n - 1)].float()
    s = sigma.view(-1, 1, 1, 1)
    (call,) = calls
    if arch == "sd3":
        assert torch.equal(call["hidden_states"], (1 - s) * x + s * eps)
        assert torch.allclose(call["timestep"], sigma * 1000)  # the scheduler's 0..1000 timesteps
        pred = call["output"]
        assert "guidance" not in call
    else:
        h = w = 8
        assert torch.equal(call["hidden_states"], pack_latents((1 - s) * x + s * eps))  # (B, 16, 64) tokens
        assert torch.allclose(call["timestep"], sigma, atol=1e-6)  # Flux takes timestep / 1000
        assert torch.equal(call["img_ids"], torch.tensor([[0.0, r, c] for r in range(4) for c in range(4)]))
        assert call["txt_ids"].shape == (T5_LEN, 3) and not call["txt_ids"].any()
        pred = unpack_latents(call["output"], h, w)
        if arch == "flux-dev":  # the guidance embedding gets --guidance_scale; schnell has none
            assert torch.equal(call["guidance"], torch.full((3,), 4.0))
        else:
            assert call.get("guidance") is None
    weight = {
        "sigma_sqrt": sigma**-2.0,
        "logit_normal": torch.ones(3),
        "cosmap": 2 / (torch.pi * (1 - 2 * sigma + 2 * sigma**2)),
    }[scheme]
    per_sample = weight * ((pred - (eps - x)) ** 2).mean(dim=(1, 2, 3))
    reference = per_sample[:2].mean() + 0.5 * per_sample[2]
    assert torch.allclose(loss, reference, rtol=1e-5), (loss, reference)
    assert torch.allclose(logs["prior_loss"], per_sample[2], rtol=1e-5)


def test_pack_latents_is_fluxs_packing_and_unpack_inverts_it():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(pack_latents(x), 6, 10), x)
    assert torch.equal(latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def test_guidance_is_passed_in_training_for_dev_only(builtin_cache, data, tmp_path, monkeypatch):
    """Spy on the transformer during real runs: dev gets --guidance_scale, schnell no guidance input."""
    from diffusion_oft.training import dit

    seen: dict[str, list] = {}
    original = dit.flow_matching_step

    def spying(family, transformer, *a, **kw):
        calls = spy_forward(transformer)
        out = original(family, transformer, *a, **kw)
        seen.setdefault(name, []).extend(c.get("guidance") for c in calls)
        return out

    monkeypatch.setattr(dit, "flow_matching_step", spying)
    for name in ("tiny-flux", "tiny-flux-schnell"):
        train_main(
            args_for(
                f"builtin:{name}",
                data,
                tmp_path / name,
                "--max_train_steps",
                "1",
                "--num_validation_images",
                "0",
                "--guidance_scale",
                "2.5",
            )
        )
    assert [g.tolist() for g in seen["tiny-flux"]] == [[2.5]]
    assert seen["tiny-flux-schnell"] == [None]


RANK_SCRIPT = """
import sys
from pathlib import Path
from safetensors.torch import save_file
from diffusion_oft.files import adapter_state_dict
from diffusion_oft.training.args import dreambooth_parser, finalize_args
from diffusion_oft.training.dit import DiTDreamBoothTrainer
from diffusion_oft.training.families import family_named

dump = Path(sys.argv[1])
args = finalize_args(dreambooth_parser().parse_args(sys.argv[2:]), "dreambooth")
trainer = DiTDreamBoothTrainer(args, family_named(args.model_family))
trainer.run()
rank = trainer.accelerator.process_index
save_file(adapter_state_dict(trainer.pipe.transformer), str(dump / f"rank{rank}.safetensors"))
(dump / f"rank{rank}.info").write_text(f"{trainer.accelerator.num_processes} {trainer.accelerator.distributed_type}")
"""


@pytest.mark.slow  # DDP
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_flux_dev_under_two_cpu_processes_ends_with_the_same_adapter(builtin_cache, tmp_path):
    """DDP over gloo: the guidance embedding's config is read through the DDP wrapper; both ranks agree."""
    resolve_model_path("builtin:tiny-flux")  # made once, before the two processes start
    data = make_subject_images(tmp_path / "subject", n=4)
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    script = tmp_path / "run_rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(Path.cwd()))
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(dump),
        *args_for(
            "builtin:tiny-flux",
            data,
            out,
            "--max_train_steps",
            "2",
            "--learning_rate",
            "1e-2",
            "--num_validation_images",
            "0",
        ),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (dump / "rank0.info").read_text() == (dump / "rank1.info").read_text() == "2 DistributedType.MULTI_CPU"
    rank0, rank1 = read_tensors(dump / "rank0.safetensors"), read_tensors(dump / "rank1.safetensors")
    assert any(v.abs().sum() > 0 for v in rank0.values()), "the adapter trained"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert read_tensors(out / "adapter.safetensors").keys()
