"""What the toy model's autoencoder lets a generator draw: the subject encoded and decoded, judged.

The main job's images pass through the VAE decoder, so its reconstructions of the subject bound what any
adapter (or full finetuning) can reach.  Encodes and decodes (posterior mean) the five photos of
``assets/subject`` and 24 renders of the subject (4 per background, the main job's six backgrounds) and
judges them with the toy world's judge: star shape, striped colours, both, subject fidelity.

    python benchmarks/vae_ceiling.py                                   # assets/toy-sd
    python benchmarks/vae_ceiling.py --model DIR --vae_state DIR/.pretrain-vae.pt   # a VAE mid-pretraining

Writes ``benchmarks/results/vae_ceiling.json`` and ``vae_ceiling.png`` (rows: photos, their
reconstructions, renders, their reconstructions).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RENDERS_PER_BACKGROUND = 4


def shown(path: str) -> str:
    """``path`` relative to the repository when inside it (results stay machine-independent)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def judge(images, backgrounds) -> dict:
    from diffusion_oft.toyworld.judge import judge_subject

    scores = judge_subject(images, backgrounds)
    n = len(images)
    return {
        "images": n,
        "star": round(scores["is_star"] * n),
        "striped": round(scores["is_striped"] * n),
        "subject": round(scores["is_subject"] * n),
        "subject_fidelity": round(scores["subject_fidelity"], 4),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"), help="a toy pipeline folder (its vae/)")
    p.add_argument(
        "--vae_state", default=None, help="a pretraining VAE state (.pretrain-vae.pt) to judge instead of DIR/vae"
    )
    p.add_argument("--vae_channels", default="16,64,64", help="with --vae_state: the VAE's block widths")
    p.add_argument("--latent_channels", type=int, default=8, help="with --vae_state: latent channels")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="vae_ceiling")
    args = p.parse_args(argv)

    from PIL import Image

    from diffusion_oft.toyworld import world
    from diffusion_oft.toyworld.evaluate import SUBJECT_BACKGROUNDS
    from diffusion_oft.toyworld.judge import read_image
    from diffusion_oft.toyworld.pretrain_tools import image_grid, reconstruct

    if args.vae_state:
        from diffusion_oft.toyworld.components import make_vae

        vae = make_vae(tuple(int(c) for c in args.vae_channels.split(",")), args.latent_channels)
        vae.load_state_dict(torch.load(args.vae_state, weights_only=True)["vae"])
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(Path(args.model) / "vae"))
    vae.eval()

    paths = sorted((ROOT / "assets" / "subject").glob("*.png"))
    photos = [Image.open(q).convert("RGB") for q in paths]
    rng = random.Random(7)
    backgrounds = [b for b in SUBJECT_BACKGROUNDS for _ in range(RENDERS_PER_BACKGROUND)]
    renders = [world.render(world.subject_scene(rng, background=b)) for b in backgrounds]

    photo_recon, render_recon = reconstruct(vae, photos), reconstruct(vae, renders)
    report = {
        "model": shown(args.model),
        "vae_state": args.vae_state and shown(args.vae_state),
        "photos": judge(photo_recon, [read_image(im).background for im in photos]),
        "photos_themselves": judge(photos, [read_image(im).background for im in photos]),
        "renders": judge(render_recon, backgrounds),
        "renders_per_background": {
            b: judge(render_recon[i : i + RENDERS_PER_BACKGROUND], [b] * RENDERS_PER_BACKGROUND)
            for i, b in zip(range(0, len(backgrounds), RENDERS_PER_BACKGROUND), SUBJECT_BACKGROUNDS, strict=True)
        },
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    blank = Image.new("RGB", photos[0].size, (255, 255, 255))
    cols = len(renders) // 2
    pad = lambda row: row + [blank] * (cols - len(row))  # noqa: E731
    rows = [pad(photos), pad(photo_recon), renders[:cols], render_recon[:cols], renders[cols:], render_recon[cols:]]
    image_grid([im for r in rows for im in r], columns=cols).save(out / f"{args.name}.png")
    print(json.dumps({k: v for k, v in report.items() if k != "renders_per_background"}, indent=2))
    for b, s in report["renders_per_background"].items():
        print(
            f"  {b:10s} star {s['star']}/{s['images']}  subject {s['subject']}/{s['images']}  "
            f"fidelity {s['subject_fidelity']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
