"""Pretrain the tiny toy-world Stable Diffusion from scratch on 2 CPU cores, reproducibly from a seed.

Phase 1 trains the VAE (64×64×3 ↔ 16×16×4) on rendered scenes; the dataset is then encoded once and
the latents' scale is measured (``vae.config.scaling_factor`` = 1/std, as in SD).  Phase 2 trains the
text encoder and the UNet together with the ε-prediction diffusion loss (min-SNR weighting, 10 %
caption dropout for classifier-free guidance, EMA weights).  The result is saved in the standard
diffusers folder layout and judged on the world's in-world prompts.

Entry point: ``python assets/pretrain_toy_model.py`` (see ``--help``); library entry :func:`pretrain`.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import components, world
from .decoder import refine_decoder, render_decoder_dataset
from .pretrain_tools import (  # noqa: F401 (re-exported: the stages' building blocks)
    JUDGE_GUIDANCE,
    JUDGE_STEPS,
    build_pipeline,
    encode_dataset,
    image_grid,
    judge_pipeline,
    lr_at,
    render_dataset,
    render_vae_dataset,
    standardise_latent,
    subject_reconstruction,
    to_unit,
    train_vae,
)


def train_denoiser(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    latent_mean,
    latent_std,
    captions,
    *,
    steps,
    batch_size,
    lr,
    generator,
    log,
    ema_decay=0.999,
    caption_dropout=0.1,
    snr_gamma=5.0,
    state_path=None,
    save_every=500,
    stop_after=None,
    info=None,
):
    """Joint text encoder + UNet training.  Returns the EMA copies (what gets saved).

    Every ``save_every`` steps the whole training state (weights, EMA, optimizer, RNG) is written
    atomically to ``state_path``; a run started again with the same arguments resumes from it."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    unet.train()
    text_encoder.train()
    running, first = None, 0
    if state_path is not None and Path(state_path).is_file():
        state = torch.load(state_path, weights_only=True)  # tensors and numbers only: no code runs
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        first, running = state["step"], state["running"]
        log(f"resumed from {state_path} at step {first}")
        if info is not None:
            info["resumed_at"] = first
    for step in range(first, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=200)
        idx = torch.randint(0, len(latent_mean), (batch_size,), generator=generator)
        latents = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        latents = latents * scheduler.latent_scale
        batch_ids = ids[idx].clone()
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        batch_ids[drop] = empty
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(batch_ids)[0]).sample
        weight = torch.clamp(snr[t], max=snr_gamma) / snr[t]  # min-SNR-γ for ε-prediction
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params, strict=False):
                e.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if state_path is not None and (step + 1) % save_every == 0 and step + 1 < steps:
            state = {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": generator.get_state(),
                "step": step + 1,
                "running": running,
            }
            torch.save(state, str(state_path) + ".tmp")
            Path(str(state_path) + ".tmp").replace(state_path)
        if stop_after is not None and step + 1 >= stop_after:  # tests: an interruption
            raise KeyboardInterrupt
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step:5d}/{steps}  loss {running:.4f}  lr {opt.param_groups[0]['lr']:.2e}")
    return ema_unet, ema_text


def pretrain(
    output_dir: str | Path,
    *,
    seed: int = 0,
    dataset_size: int = 20000,
    vae_steps: int = 1200,
    vae_batch_size: int = 32,
    unet_steps: int = 2800,
    batch_size: int = 64,
    lr: float = 1e-3,
    threads: int | None = None,
    log=print,
    judge_seeds=(0, 1),
    judge_steps: int = JUDGE_STEPS,
    save_every: int = 500,
    stop_after: int | None = None,
    vae_channels: tuple[int, ...] = (16, 32, 32),
    latent_channels: int = 4,
    vae_data: str = "world",
    vae_lr: float | None = None,
    vae_logvar_init: float | None = None,
    vae_gradient_weight: float = 0.0,
    vae_equivariance: float = 0.0,
    vae_standardise: bool = False,
    latent_signal_scale: float = 1.0,
    vae_only: bool = False,
) -> dict:
    """Run both phases (resuming from the state files in output_dir if a run was interrupted) and write
    the pipeline, samples.png and pretraining.json to output_dir.  Returns the report.

    The autoencoder: ``vae_channels`` / ``latent_channels`` (the UNet takes that many channels),
    ``vae_data`` "world" (the stage-1 scenes + as many generic images) or "codec" (the stage-1 scenes + as
    many of the decoder stage's images: stage-1 and stage-2 scenes, striped objects of every shape, generic
    images — never the subject), ``vae_lr`` (default ``lr``), ``vae_logvar_init``, ``vae_gradient_weight``,
    ``vae_equivariance`` (the share of EQ-VAE steps: the latent and the image quarter-turned and downscaled
    alike, which smooths the latent), ``vae_standardise`` (fold a per-channel standardisation of the latent
    into the VAE after its phase: every channel gets unit spread). ``latent_signal_scale`` s: the UNet sees
    the latent at std s instead of 1 (the scaling factor's job), so the same noise hides more of it (the
    usual remedy for latents with more channels per pixel). ``vae_only`` stops after the autoencoder phase
    (its state stays in output_dir; a later call resumes with the UNet) and returns the autoencoder's
    figures."""
    if vae_data not in ("world", "codec"):
        raise ValueError(f"vae_data must be 'world' or 'codec', not {vae_data!r}")
    if not latent_signal_scale > 0:
        raise ValueError(f"latent_signal_scale must be > 0, not {latent_signal_scale}")
    if not 0.0 <= vae_equivariance <= 1.0:
        raise ValueError(f"vae_equivariance is a share of the VAE steps, in [0, 1], not {vae_equivariance}")
    from diffusers import DDPMScheduler

    output_dir = Path(output_dir)
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pixels, captions = render_dataset(dataset_size, seed)
    log(f"rendered {len(pixels)} scenes in {time.time() - start:.1f}s")

    tokenizer = components.make_tokenizer(output_dir / "tokenizer")
    text_encoder = components.make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    vae = components.make_vae(vae_channels, latent_channels, vae_logvar_init)
    unet = components.make_unet(latent_channels)
    output_dir.mkdir(parents=True, exist_ok=True)
    vae_state = output_dir / ".pretrain-vae.pt"
    t0 = time.time()
    if vae_state.is_file():  # resuming: phase 1 is done
        saved = torch.load(vae_state, weights_only=True)
        vae.load_state_dict(saved["vae"])
        generator.set_state(saved["generator"])
        vae.eval()
        log(f"resumed the VAE from {vae_state}")
    else:
        if vae_data == "codec":
            vae_pixels = torch.cat([pixels, render_decoder_dataset(len(pixels), seed)])
        else:
            vae_pixels = render_vae_dataset(pixels, n_generic=len(pixels), seed=seed)
        train_vae(
            vae,
            vae_pixels,
            vae_steps,
            vae_batch_size,
            vae_lr or lr,
            generator,
            log,
            gradient_weight=vae_gradient_weight,
            equivariance=vae_equivariance,
        )
        del vae_pixels
        if vae_standardise:
            standardise_latent(vae, encode_dataset(vae, pixels[:4000])[0])
        torch.save({"vae": vae.state_dict(), "generator": generator.get_state()}, vae_state)
    vae_time = time.time() - t0
    latent_mean, latent_std = encode_dataset(vae, pixels)
    scale = latent_signal_scale / latent_mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    vae_subject = subject_reconstruction(vae)
    log(
        f"VAE trained in {vae_time:.0f}s; latent std {1 / scale:.3f} → scaling_factor {scale:.4f}; "
        f"subject fidelity of its reconstructions {vae_subject:.3f}"
    )
    if vae_only:
        return {"vae_seconds": round(vae_time, 1), "scaling_factor": scale, "vae_subject_reconstruction": vae_subject}

    scheduler = DDPMScheduler(**components.make_scheduler_config(), clip_sample=False)
    scheduler.latent_scale = scale
    t0 = time.time()
    info: dict = {}
    ema_unet, ema_text = train_denoiser(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        latent_mean,
        latent_std,
        captions,
        steps=unet_steps,
        batch_size=batch_size,
        lr=lr,
        generator=generator,
        log=log,
        state_path=output_dir / ".pretrain-state.pt",
        save_every=save_every,
        stop_after=stop_after,
        info=info,
    )
    unet_time = time.time() - t0

    pipe = build_pipeline(ema_unet, vae, ema_text, tokenizer)
    scores, images, _ = judge_pipeline(pipe, seeds=judge_seeds, steps=judge_steps)
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    image_grid(images, columns=len(world.in_world_prompts())).save(output_dir / "samples.png")
    report = {
        "seed": seed,
        "dataset_size": dataset_size,
        "vae_steps": vae_steps,
        "vae_batch_size": vae_batch_size,
        "vae_channels": list(vae_channels),
        "latent_channels": latent_channels,
        "vae_data": vae_data,
        "vae_lr": vae_lr or lr,
        "vae_logvar_init": vae_logvar_init,
        "vae_gradient_weight": vae_gradient_weight,
        "vae_equivariance": vae_equivariance,
        "vae_standardise": vae_standardise,
        "latent_signal_scale": latent_signal_scale,
        "unet_steps": unet_steps,
        "batch_size": batch_size,
        "lr": lr,
        "threads": torch.get_num_threads(),
        "vae_seconds": round(vae_time, 1),
        "unet_seconds": round(unet_time, 1),
        "total_seconds": round(time.time() - start, 1),
        "scaling_factor": scale,
        "vae_subject_reconstruction": round(vae_subject, 4),
        "judge": {"steps": judge_steps, "guidance_scale": JUDGE_GUIDANCE, "seeds": list(judge_seeds), **scores},
        "resumed_at": info.get("resumed_at"),
    }
    (output_dir / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    for f in (vae_state, output_dir / ".pretrain-state.pt"):
        f.unlink(missing_ok=True)
    log(f"judge on in-world prompts: {json.dumps(scores)}")
    return report


def render_extended_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n scenes of pretraining stage 2 (world.sample_extended_scene) and their captions."""
    rng = random.Random(seed + 2)
    scenes = [world.sample_extended_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(world.render(s)) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [world.caption(s) for s in scenes]


def extend(
    model_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    seed: int = 0,
    dataset_size: int = 8000,
    steps: int = 1200,
    batch_size: int = 32,
    lr: float = 5e-4,
    ema_decay: float = 0.995,
    threads: int | None = None,
    log=print,
    judge_seeds=(0, 1),
    judge_steps: int = JUDGE_STEPS,
    save_every: int = 500,
    stop_after: int | None = None,
) -> dict:
    """Pretraining stage 2: continue training a stage-1 model's text encoder and UNet on the extended
    world (stars, purple and orange, two-colour stripes; half the batches' scenes still from stage 1),
    the VAE unchanged.  Writes the pipeline to ``output_dir`` (default: in place) and adds a "stage2"
    entry to its pretraining.json.  Resumable like stage 1."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_dir = Path(model_dir)
    output_dir = Path(output_dir or model_dir)
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 2)
    report_path = model_dir / "pretraining.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if "stage2" in report:
        raise ValueError(f"{model_dir} has had stage 2 already (pretraining.json); start from a stage-1 model")
    tokenizer = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"))
    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae")).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    pixels, captions = render_extended_dataset(dataset_size, seed)
    latent_mean, latent_std = encode_dataset(vae, pixels)
    log(f"stage 2: {len(pixels)} scenes rendered and encoded in {time.time() - start:.1f}s")
    scheduler = DDPMScheduler(**components.make_scheduler_config(), clip_sample=False)
    scheduler.latent_scale = vae.config.scaling_factor
    output_dir.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    t0 = time.time()
    ema_unet, ema_text = train_denoiser(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        latent_mean,
        latent_std,
        captions,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        generator=generator,
        log=log,
        ema_decay=ema_decay,
        state_path=output_dir / ".extend-state.pt",
        save_every=save_every,
        stop_after=stop_after,
        info=info,
    )
    seconds = time.time() - t0
    pipe = build_pipeline(ema_unet, vae, ema_text, tokenizer)
    scores, images, _ = judge_pipeline(pipe, seeds=judge_seeds, steps=judge_steps)
    extended, ext_images, _ = judge_pipeline(
        pipe, seeds=judge_seeds, steps=judge_steps, targets=world.extended_prompts()
    )
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    columns = len(world.in_world_prompts())
    image_grid(images[:columns] + ext_images[:columns], columns=columns).save(output_dir / "samples.png")
    report["stage1_judge"] = report.get("judge")
    report["judge"] = {"steps": judge_steps, "guidance_scale": JUDGE_GUIDANCE, "seeds": list(judge_seeds), **scores}
    report["stage2"] = {
        "seed": seed,
        "dataset_size": dataset_size,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "judge_extended": extended,
        "resumed_at": info.get("resumed_at"),
    }
    (output_dir / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / ".extend-state.pt").unlink(missing_ok=True)
    log(f"stage 2 done in {seconds:.0f}s; in-world {json.dumps(scores)}; extended vocabulary {json.dumps(extended)}")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=str(Path(__file__).resolve().parents[2] / "assets" / "toy-sd"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset_size", type=int, default=20000)
    p.add_argument("--vae_steps", type=int, default=1200)
    p.add_argument("--unet_steps", type=int, default=2800)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae_channels", default="16,32,32", help="the VAE's block widths, comma-separated")
    p.add_argument("--latent_channels", type=int, default=4, help="channels of the 16×16 latent (and the UNet's input)")
    p.add_argument(
        "--vae_data",
        choices=("world", "codec"),
        default="world",
        help="world: scenes + generic images; codec: "
        "scenes + stage-2 scenes, striped objects of every shape and generic images",
    )
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=None, help="the VAE's peak learning rate (default --lr)")
    p.add_argument("--vae_logvar_init", type=float, default=None, help="initial posterior log-variance (e.g. -6)")
    p.add_argument("--vae_gradient_weight", type=float, default=0.0, help="weight of the image-gradient L1 loss")
    p.add_argument(
        "--vae_equivariance",
        type=float,
        default=0.0,
        help="share of EQ-VAE steps (latent and image turned and downscaled alike: a smoother latent)",
    )
    p.add_argument(
        "--vae_standardise",
        action="store_true",
        help="fold a per-channel standardisation of the latent into the VAE (every channel at unit spread)",
    )
    p.add_argument(
        "--latent_signal_scale",
        type=float,
        default=1.0,
        help="std of the latent the UNet sees (1: the usual scaling factor; < 1 puts more training at low SNR)",
    )
    p.add_argument(
        "--vae_only",
        action="store_true",
        help="stop after the autoencoder phase (kept in --output_dir; run again without it to go on)",
    )
    p.add_argument("--extend_steps", type=int, default=1200, help="stage 2 steps (0: stage 1 only)")
    p.add_argument(
        "--stage2_only", action="store_true", help="run stage 2 on the stage-1 model already in --output_dir"
    )
    p.add_argument(
        "--decoder_steps",
        type=int,
        default=0,
        help="stage 3: train the VAE decoder further on frozen encoder latents (0: skip)",
    )
    p.add_argument("--decoder_only", action="store_true", help="run only stage 3 on the model already in --output_dir")
    args = p.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.decoder_only:
        refine_decoder(args.output_dir, seed=args.seed, steps=args.decoder_steps or 900, threads=args.threads, log=log)
        return 0
    if not args.stage2_only:
        pretrain(
            args.output_dir,
            seed=args.seed,
            dataset_size=args.dataset_size,
            vae_steps=args.vae_steps,
            vae_batch_size=args.vae_batch_size,
            vae_channels=tuple(int(c) for c in args.vae_channels.split(",")),
            latent_channels=args.latent_channels,
            vae_data=args.vae_data,
            vae_lr=args.vae_lr,
            vae_logvar_init=args.vae_logvar_init,
            vae_gradient_weight=args.vae_gradient_weight,
            vae_equivariance=args.vae_equivariance,
            vae_standardise=args.vae_standardise,
            latent_signal_scale=args.latent_signal_scale,
            unet_steps=args.unet_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            threads=args.threads,
            log=log,
            vae_only=args.vae_only,
        )
        if args.vae_only:
            return 0
    if args.extend_steps > 0:
        extend(args.output_dir, seed=args.seed, steps=args.extend_steps, threads=args.threads, log=log)
    if args.decoder_steps > 0:
        refine_decoder(args.output_dir, seed=args.seed, steps=args.decoder_steps, threads=args.threads, log=log)
    return 0
