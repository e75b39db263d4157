"""Stage 3 of the toy model's pretraining: the VAE decoder trained further on frozen encoder latents."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .pretrain_tools import (
    JUDGE_GUIDANCE,
    JUDGE_STEPS,
    build_pipeline,
    encode_dataset,
    image_gradient_loss,
    image_grid,
    judge_pipeline,
    lr_at,
    subject_reconstruction,
    to_unit,
)


def render_decoder_dataset(n: int, seed: int) -> torch.Tensor:
    """The decoder stage's images, (n, 3, 64, 64) uint8: a quarter each of stage-1 scenes, stage-2 scenes,
    striped objects of every shape (world.sample_codec_scene) and generic images."""
    rng = random.Random(seed + 3)
    makers = (
        lambda: world.render(world.sample_scene(rng)),
        lambda: world.render(world.sample_extended_scene(rng)),
        lambda: world.render(world.sample_codec_scene(rng)),
        lambda: world.generic_image(rng),
    )
    pixels = np.stack([np.asarray(makers[i % len(makers)]()) for i in range(n)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


def train_decoder(
    vae,
    latent_mean,
    latent_std,
    pixels,
    steps: int,
    batch_size: int,
    lr: float,
    generator,
    log,
    gradient_weight: float = 1.0,
) -> None:
    """Train the decoder and post_quant_conv on fixed encoder posteriors (the encoder, hence the latent
    space the UNet was trained on, is unchanged): L1 + MSE + ``gradient_weight`` × image-gradient L1."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae.decoder.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=50)
        idx = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        x = to_unit(pixels[idx])
        z = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        recon = vae.decode(z).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec_loss + gradient_weight * image_gradient_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step:5d}/{steps}  reconstruction {rec_loss.item():.4f}  loss {loss.item():.4f}")
    vae.eval()


def refine_decoder(
    model_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    seed: int = 0,
    dataset_size: int = 4000,
    steps: int = 900,
    batch_size: int = 24,
    lr: float = 1e-3,
    gradient_weight: float = 1.0,
    threads: int | None = None,
    log=print,
    judge_seeds=(0, 1),
    judge_steps: int = JUDGE_STEPS,
) -> dict:
    """Pretraining stage 3: train the VAE's decoder further, the encoder frozen, on world scenes, striped
    objects of every shape and generic images (never the subject's photos or colours pair).  The latent
    space, the UNet and everything trained on latents stay valid.  Writes the VAE to ``output_dir``
    (default: in place) and adds a "decoder" entry to pretraining.json."""
    from diffusers import AutoencoderKL

    model_dir = Path(model_dir)
    output_dir = Path(output_dir or model_dir)
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 3)
    report_path = model_dir / "pretraining.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if "decoder" in report:
        raise ValueError(f"{model_dir} has had the decoder stage already (pretraining.json); start from stage 2")
    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae")).eval()
    vae.requires_grad_(False)
    before = subject_reconstruction(vae)
    pixels = render_decoder_dataset(dataset_size, seed)
    latent_mean, latent_std = encode_dataset(vae, pixels)
    log(f"decoder stage: {len(pixels)} images rendered and encoded in {time.time() - start:.1f}s")
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    t0 = time.time()
    train_decoder(vae, latent_mean, latent_std, pixels, steps, batch_size, lr, generator, log, gradient_weight)
    seconds = time.time() - t0
    vae.requires_grad_(False)
    after = subject_reconstruction(vae)
    vae.save_pretrained(str(output_dir / "vae"), safe_serialization=True)
    report["decoder"] = {
        "seed": seed,
        "dataset_size": dataset_size,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "gradient_weight": gradient_weight,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "vae_subject_reconstruction_before": round(before, 4),
        "vae_subject_reconstruction": round(after, 4),
    }
    if judge_seeds:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        pipe = build_pipeline(
            UNet2DConditionModel.from_pretrained(str(model_dir / "unet")),
            vae,
            CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")),
            CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer")),
        )
        scores, images, _ = judge_pipeline(pipe, seeds=judge_seeds, steps=judge_steps)
        extended, ext_images, _ = judge_pipeline(
            pipe, seeds=judge_seeds, steps=judge_steps, targets=world.extended_prompts()
        )
        report["decoder"]["judge"] = scores
        report["decoder"]["judge_extended"] = extended
        report["judge"] = {"steps": judge_steps, "guidance_scale": JUDGE_GUIDANCE, "seeds": list(judge_seeds), **scores}
        columns = len(world.in_world_prompts())
        image_grid(images[:columns] + ext_images[:columns], columns=columns).save(output_dir / "samples.png")
    (output_dir / "pretraining.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"decoder stage done in {seconds:.0f}s; subject reconstructions {before:.3f} → {after:.3f}")
    return report
