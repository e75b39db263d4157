"""`diffusion-oft demo`: a one-minute offline tour on a tiny model built from configs.

Adds an adapter to a tiny Stable Diffusion UNet, trains it with the diffusion loss on a few
synthetic images, saves it, reloads it into a fresh pipeline and checks the round trip.
"""

from __future__ import annotations

import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, save and reload an adapter on a built-in tiny model (offline)")
    from ..methods import METHOD_REGISTRY

    lrs = ", ".join(f"{n} {cls.training_defaults['demo']['learning_rate']:g}" for n, cls in METHOD_REGISTRY.items())
    p.add_argument("--method", default="oft", choices=list(METHOD_REGISTRY))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--learning_rate", type=float, default=None, help=f"default per method: {lrs}")
    p.add_argument("--output_dir", default="diffusion-oft-demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def synthetic_images(n: int, size: int = 32):
    """n images of a yellow disc on a blue background, as a (n, 3, size, size) tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    images = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (40, 60, 200))
        r = size // 4 + i % 3
        c = size // 2 + (i % 2) * 2
        ImageDraw.Draw(img).ellipse([c - r, c - r, c + r, c + r], fill=(240, 220, 40))
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(images)


def run(args) -> int:
    import torch
    import torch.nn.functional as F

    import diffusion_oft as do
    from diffusion_oft.methods import get_method_class
    from diffusion_oft.tiny import tiny_sd_pipeline

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    pipe = tiny_sd_pipeline(seed=args.seed)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    # The tiny UNet's widths (32, 64) take the method's demo structure where its library default does not fit.
    demo = dict(get_method_class(args.method).training_defaults["demo"])
    lr = args.learning_rate or demo.pop("learning_rate")
    demo.pop("learning_rate", None)
    config = do.AdapterConfig(method=args.method, **demo)
    do.add_adapter(unet, config)
    print(
        f"{args.method}: {do.count_adapter_parameters(unet):,} trainable parameters on "
        f"{len(do.model.ortho_layers(unet))} projections of a tiny UNet"
    )

    images = synthetic_images(4)
    prompt = "a photo of sks disc"
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer([prompt] * len(images), padding="max_length", return_tensors="pt").input_ids
        text = text_encoder(ids)[0]
    optimizer = torch.optim.AdamW(do.adapter_parameters(unet), lr=lr, weight_decay=0.0)
    scheduler = pipe.scheduler
    unet.train()
    start, losses = time.time(), []
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        do.apply_constraints(unet)
        losses.append(loss.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"  step {step + 1:4d}/{args.steps}  loss {loss.item():.4f}")
    unet.eval()
    first = sum(losses[:10]) / min(10, len(losses))
    last = sum(losses[-10:]) / min(10, len(losses))
    print(f"mean loss of the first 10 steps {first:.4f} -> last 10 steps {last:.4f} ({time.time() - start:.1f} s)")

    path = do.save_adapter(unet, out / "adapter.safetensors")
    fresh = tiny_sd_pipeline(seed=args.seed)
    do.load_adapter(fresh, path)
    latents_in = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = torch.equal(unet(latents_in, 10, text[:1]).sample, fresh.unet(latents_in, 10, text[:1]).sample)
    print(
        f"saved {path} ({path.stat().st_size / 1024:.1f} KiB); reloaded into a fresh pipeline: "
        f"{'identical outputs' if same else 'OUTPUTS DIFFER'}"
    )
    image = fresh(
        prompt, num_inference_steps=10, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images[0]
    image.resize((128, 128)).save(out / "sample.png")
    print(f"sample image: {out / 'sample.png'}")
    return 0 if same else 1
