"""Can the toy UNet learn this autoencoder's latent?  A short stage-1 proxy before a full rebuild.

Trains the toy model's stage-1 text encoder and UNet from scratch for ``--steps`` steps (batch 64, the
shipped recipe's schedule shortened) on the latents of ``--vae`` and judges the in-world prompts — run
it for a candidate VAE and for the shipped one side by side (one thread each) and compare.

    python benchmarks/latent_proxy.py --vae assets/toy-sd/vae --name shipped
    python benchmarks/latent_proxy.py --vae DIR/vae --standardise --name candidate

``--standardise`` first folds a per-channel standardisation of the latent mean into ``quant_conv`` and
``post_quant_conv`` (an exact reparametrisation: every channel gets unit spread under the standard
pipeline's single scaling factor).  ``--signal_scale s`` scales the latent to std s instead of 1: the
same noise then hides more of it — the usual remedy for a latent with more channels per pixel, whose
redundant channels survive a given noise level longer (0.707 and 0.5 did not help the 8-channel
candidate: benchmarks/README).
Writes ``<output_dir>/latent_proxy_<name>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="an AutoencoderKL folder (e.g. assets/toy-sd/vae)")
    p.add_argument("--standardise", action="store_true", help="fold a per-channel standardisation in first")
    p.add_argument(
        "--signal_scale",
        type=float,
        default=1.0,
        help="multiply the scaling factor (latent std 1 → this): below 1 puts more of training at low SNR "
        "(e.g. 0.707 for 8 channels against 4)",
    )
    p.add_argument(
        "--posterior_mean",
        action="store_true",
        help="train on the posterior means instead of samples (no posterior noise in the UNet's data)",
    )
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--dataset_size", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="candidate")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from diffusers import AutoencoderKL, DDPMScheduler

    from diffusion_oft.toyworld import components
    from diffusion_oft.toyworld.pretrain import render_dataset, train_denoiser
    from diffusion_oft.toyworld.pretrain_tools import (
        build_pipeline,
        encode_dataset,
        image_grid,
        judge_pipeline,
        standardise_latent,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    pixels, captions = render_dataset(args.dataset_size, 0)
    if args.standardise:
        standardise_latent(vae, encode_dataset(vae, pixels[:4000])[0])
    latent_mean, latent_std = encode_dataset(vae, pixels)
    if args.posterior_mean:
        latent_std = torch.zeros_like(latent_std)
    scale = args.signal_scale / latent_mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = components.make_tokenizer(Path(tmp) / "tokenizer")
    text_encoder = components.make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = components.make_unet(vae.config.latent_channels)
    scheduler = DDPMScheduler(**components.make_scheduler_config(), clip_sample=False)
    scheduler.latent_scale = scale
    start = time.time()
    ema_unet, ema_text = train_denoiser(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        latent_mean,
        latent_std,
        captions,
        steps=args.steps,
        batch_size=64,
        lr=1e-3,
        generator=torch.Generator().manual_seed(0),
        log=lambda m: print(m, flush=True),
    )
    seconds = time.time() - start
    scores, images, _ = judge_pipeline(build_pipeline(ema_unet, vae, ema_text, tokenizer), seeds=(0, 1))
    channel_std = (latent_mean * scale).std((0, 2, 3))
    report = {
        "vae": args.vae,
        "standardise": args.standardise,
        "signal_scale": args.signal_scale,
        "posterior_mean": args.posterior_mean,
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "scaling_factor": scale,
        "channel_std": [round(v, 3) for v in channel_std.tolist()],
        "judge": scores,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"latent_proxy_{args.name}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    image_grid(images, columns=len(images) // 2).save(out / f"latent_proxy_{args.name}.png")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
