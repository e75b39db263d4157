"""The Stable Diffusion / SDXL DreamBooth trainer (``dreambooth.main`` runs it; ``dit.py`` subclasses it)."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from ..model import add_adapter, count_adapter_parameters, find_targets, validate_targets
from .args import TEXT_ENCODER_TARGETS, adapter_config_from_args
from .data import BadDataWarning, DreamBoothDataset, collate_dreambooth, list_images, mix_seed, sidecar_caption
from .latents import LatentCache, cache_dataset_latents, scale_latents
from .loop import ADAPTER_FILE, AdapterTrainer, cast_trainable_to_fp32, trainable_adapter_params
from .loss import diffusion_loss, sample_noise, sample_timesteps, training_target
from .models import encode_prompts, encode_prompts_cached, inference_pipeline, load_base_model, sdxl_time_ids, to_device
from .validation import image_grid


def check_fits(module: nn.Module, config: AdapterConfig, component: str) -> None:
    """Refuse (before any slow work) a structure that does not fit a layer, naming what would."""
    try:
        validate_targets(module, config, find_targets(module, config))
    except ValueError as err:
        raise ValueError(f"the adapter does not fit the {component}: {err}") from None


def encode_latents(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE latents (sampled with ``generator``), shifted and scaled as the UNet expects."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return scale_latents(vae, dist.sample(generator=generator))


def vae_dtype(base, args, weight_dtype: torch.dtype) -> torch.dtype:
    # SDXL's original VAE overflows in fp16: keep it in fp32 unless another VAE is given (as diffusers does).
    if base.is_sdxl and args.pretrained_vae_model_name_or_path is None:
        return torch.float32
    return weight_dtype


# A judge scores the trained adapter: judge(pipeline, output_dir, log=...) -> {setting: scores}.  The
# training floor never imports one: the caller hands it in (``--judge toyworld``: the command line and
# train_scripts/train_dreambooth.py pass ``diffusion_oft.toyworld.evaluate.judge_adapter``).
Judge = Callable[..., dict]


class DreamBoothTrainer(AdapterTrainer):
    task = "dreambooth"
    project_name = "dreambooth-oft"

    def __init__(self, args, judge: Judge | None = None):
        super().__init__(args)
        self.judge = judge

    def setup(self) -> None:
        args, accelerator = self.args, self.accelerator
        device, dtype = accelerator.device, self.weight_dtype
        self.base = base = load_base_model(args)
        self.unet_config = adapter_config_from_args(args)
        self.te_config = adapter_config_from_args(args, targets=TEXT_ENCODER_TARGETS)
        check_fits(base.unet, self.unet_config, "unet")
        if args.train_text_encoder:
            for name, encoder in zip(base.text_encoder_names(), base.text_encoders, strict=True):
                check_fits(encoder, self.te_config, name)
        if args.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ValueError(
                    "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers"
                ) from None
        with warnings.catch_warnings():  # already reported by finalize_args
            warnings.simplefilter("ignore", BadDataWarning)
            instance_images = list_images(args.instance_data_dir, "--instance_data_dir", strict=args.strict)
        to_device(base.vae, device, vae_dtype(base, args, dtype))
        for encoder in base.text_encoders:
            to_device(encoder, device, dtype)
        to_device(base.unet, device, dtype)
        class_images = self.prepare_class_images() if args.with_prior_preservation else None

        add_adapter(base.unet, self.unet_config, args.adapter_name)
        cast_trainable_to_fp32(base.unet)
        self.trained_encoders = []
        if args.train_text_encoder:
            for encoder in base.text_encoders:
                add_adapter(encoder, self.te_config, args.adapter_name)
                cast_trainable_to_fp32(encoder)
                self.trained_encoders.append(encoder)
        if args.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for encoder in self.trained_encoders:
                encoder.gradient_checkpointing_enable()
        if args.enable_xformers_memory_efficient_attention:
            base.unet.enable_xformers_memory_efficient_attention()
        self.dataset = DreamBoothDataset(instance_images, args.resolution, args.center_crop, args.seed, class_images)
        self.collate_fn = collate_dreambooth
        self.num_instance_images = len(instance_images)
        captioned = sum(sidecar_caption(p) is not None for p in instance_images)
        if captioned:
            self.log(
                f"{captioned} of {len(instance_images)} instance images have their own caption (<name>.txt); "
                f"the others use --instance_prompt {args.instance_prompt!r}"
            )
        self.num_class_images = len(class_images or [])
        self._prompt_cache: dict[str, tuple] = {}
        self.latent_cache = self.build_latent_cache()

    def build_latent_cache(self) -> LatentCache | None:
        """The VAE's output for every training image, when the crops do not change between steps."""
        args, dataset = self.args, self.dataset
        chunk = args.train_batch_size * (2 if args.with_prior_preservation else 1)
        return cache_dataset_latents(self.vae, dataset, args, self.log, dataset.all_images(), chunk)

    # ---- prior preservation ------------------------------------------------------------------------
    def prepare_class_images(self) -> list[Path]:
        """Generate the missing class images with the base model (main process), then list them."""
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        folder = Path(args.class_data_dir)
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        existing = list_images(folder, "--class_data_dir", allow_empty=True, strict=args.strict)
        missing = args.num_class_images - len(existing)
        if missing > 0 and self.is_main:
            self.log(f"generating {missing} class images for {args.class_prompt!r} in {folder}")
            pipe = self.make_pipeline()
            start_index = len(existing)
            with torch.no_grad():
                for start in tqdm(range(0, missing, args.sample_batch_size), desc="class images"):
                    n = min(args.sample_batch_size, missing - start)
                    gens = [
                        torch.Generator().manual_seed(mix_seed(args.seed, 0xC1A55, start_index + start + i))
                        for i in range(n)
                    ]
                    images = pipe(
                        [args.class_prompt] * n,
                        num_inference_steps=args.class_inference_steps,
                        generator=gens,
                        height=args.resolution,
                        width=args.resolution,
                        **self.pipeline_kwargs(),
                    ).images
                    for i, image in enumerate(images):
                        digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
                        path = folder / f"{start_index + start + i:05d}-{digest}.png"
                        tmp = folder / f".{path.name}.tmp.png"
                        image.save(tmp)
                        tmp.replace(path)
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        accelerator.wait_for_everyone()
        with warnings.catch_warnings():  # reported above
            warnings.simplefilter("ignore", BadDataWarning)
            return list_images(folder, "--class_data_dir", strict=args.strict)[: args.num_class_images]

    # ---- what differs per model family (overridden by training/dit.py) ------------------------------
    @property
    def vae(self) -> nn.Module:
        return self.base.vae

    def make_pipeline(self):
        """The text-to-image pipeline around the (adapted) components, for class and validation images."""
        return inference_pipeline(self.base)

    def pipeline_kwargs(self) -> dict:
        """Extra arguments of the pipeline's calls."""
        return {}

    def pipeline_class_name(self) -> str:
        return "StableDiffusionXLPipeline" if self.base.is_sdxl else "StableDiffusionPipeline"

    def model_tags(self) -> list[str]:
        return ["stable-diffusion-xl"] if self.base.is_sdxl else ["stable-diffusion"]

    # ---- the trainer interface ---------------------------------------------------------------------
    def adapted_components(self) -> dict[str, nn.Module]:
        comps = {"unet": self.base.unet}
        for name, encoder in zip(self.base.text_encoder_names(), self.base.text_encoders, strict=True):
            if encoder in self.trained_encoders:
                comps[name] = encoder
        return comps

    def trainable_modules(self) -> list[nn.Module]:
        return [self.base.unet, *self.trained_encoders]

    def param_groups(self) -> list[dict]:
        name = self.args.adapter_name
        groups = [{"params": trainable_adapter_params(self.base.unet, name), "lr": self.args.learning_rate}]
        te_params = [p for e in self.trained_encoders for p in trainable_adapter_params(e, name)]
        if te_params:
            groups.append({"params": te_params, "lr": self.args.text_encoder_lr})
        return groups

    def on_prepared(self, modules: list[nn.Module]) -> None:
        self.train_unet = modules[0]
        self.train_encoders = modules[1:]

    def _encoders_for_loss(self) -> list[nn.Module]:
        if not self.trained_encoders:
            return self.base.text_encoders
        wrapped = dict(zip(map(id, self.trained_encoders), self.train_encoders, strict=True))
        return [wrapped.get(id(e), e) for e in self.base.text_encoders]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.trained_encoders:
            return encode_prompts(self.base, prompts, self._encoders_for_loss())
        return encode_prompts_cached(self.base, prompts, self._prompt_cache)

    def compute_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        args, base = self.args, self.base
        device, dtype = self.accelerator.device, self.weight_dtype
        with torch.no_grad():
            if self.latent_cache is not None:  # same sample as encode_latents: same parameters, same generator
                dist = self.latent_cache.distribution(batch["image_paths"])
                latents = scale_latents(base.vae, dist.sample(generator=generator)).to(dtype)
            else:
                latents = encode_latents(base.vae, batch["pixel_values"], generator).to(dtype)
        noise = sample_noise(latents, generator, args.noise_offset)
        timesteps = sample_timesteps(latents.shape[0], base.noise_scheduler, generator, device)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        n_inst = batch["num_instance"]
        captions = batch.get("class_captions") or [None] * (latents.shape[0] - n_inst)
        instance_captions = batch.get("instance_captions") or [None] * n_inst
        prompts = [c or args.instance_prompt for c in instance_captions] + [c or args.class_prompt for c in captions]
        embeds, pooled = self.encode(prompts)
        kwargs = {}
        if base.is_sdxl:
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], args.resolution, device, dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        pred = self.train_unet(noisy, timesteps, embeds.to(dtype), **kwargs).sample
        target = training_target(base.noise_scheduler, latents, noise, timesteps)
        return diffusion_loss(
            pred,
            target,
            timesteps,
            base.noise_scheduler,
            args.snr_gamma,
            num_instance=n_inst if args.with_prior_preservation else None,
            prior_loss_weight=args.prior_loss_weight,
        )

    # ---- validation, outputs -----------------------------------------------------------------------
    def validation_prompts(self) -> list[str]:
        return list(self.args.validation_prompt or [self.args.instance_prompt])

    def validation_grid(self, final: bool):
        args = self.args
        if args.num_validation_images == 0:
            return None
        pipe = self.make_pipeline()
        rows, images = [], []
        for prompt in self.validation_prompts():
            row = pipe(
                prompt,
                num_images_per_prompt=args.num_validation_images,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=torch.Generator().manual_seed(args.seed),
                **self.pipeline_kwargs(),
            ).images
            rows.append(row)
            images.extend(row)
        return image_grid(rows, labels=self.validation_prompts()), images

    def extra_metadata(self) -> dict[str, str]:
        return {"instance_prompt": self.args.instance_prompt}

    def run(self) -> dict:
        summary = super().run()
        if self.args.judge and self.is_main:
            self.set_train_mode(False)
            pipe = self.make_pipeline()
            summary["judge"] = self.judge(pipe, self.output_dir, log=self.log)
            self.log(f"judge figures: {self.output_dir / 'judge.md'}, images: {self.output_dir / 'judge.png'}")
        return summary

    def training_summary(self) -> dict:
        summary = super().training_summary()
        summary.update(
            instance_prompt=self.args.instance_prompt, with_prior_preservation=bool(self.args.with_prior_preservation)
        )
        return summary

    def write_model_card(self) -> None:
        args = self.args
        comps = self.adapted_components()
        params = {name: count_adapter_parameters(m, args.adapter_name) for name, m in comps.items()}
        article = "An" if args.method[0] in "aeiou" else "A"
        summary = (
            f"{article} {args.method.upper()} adapter for `{args.pretrained_model_name_or_path}` that binds a "
            f"subject to the prompt `{args.instance_prompt}` (DreamBooth-style)."
        )
        rows = [
            ("base model", f"`{args.pretrained_model_name_or_path}`"),
            ("method", args.method),
            ("trainable parameters", ", ".join(f"{k} {v:,}" for k, v in params.items())),
            (
                "steps",
                f"{self.global_step} (batch {args.train_batch_size}, accumulation "
                f"{args.gradient_accumulation_steps}, {self.accelerator.num_processes} process(es))",
            ),
            ("learning rate", f"{args.learning_rate:g} ({args.lr_scheduler})"),
            ("resolution", str(args.resolution)),
            ("instance prompt", f"`{args.instance_prompt}` ({self.num_instance_images} images)"),
            (
                "prior preservation",
                f"`{args.class_prompt or 'captioned'}`, {self.num_class_images} class images, "
                f"weight "
                f"{args.prior_loss_weight:g}"
                if args.with_prior_preservation
                else "no",
            ),
            ("text encoder adapter", "yes" if args.train_text_encoder else "no"),
        ]
        pipe_cls = self.pipeline_class_name()
        usage = f"""
import torch
from diffusers import {pipe_cls}
import diffusion_oft

pipe = {pipe_cls}.from_pretrained("{args.pretrained_model_name_or_path}")
diffusion_oft.load_adapter(pipe, "{ADAPTER_FILE}")
image = pipe("{args.instance_prompt}").images[0]
"""
        from .model_card import write_model_card

        configs = {name: m.ortho_adapter_configs[args.adapter_name].to_dict() for name, m in comps.items()}
        path = write_model_card(
            self.output_dir,
            args.pretrained_model_name_or_path,
            f"DreamBooth {args.method.upper()} adapter",
            summary,
            rows,
            configs,
            "samples.png" if "samples" in self.outputs else None,
            self.validation_prompts()[0],
            usage,
            tags=["text-to-image", "diffusion-oft", args.method, "dreambooth"] + self.model_tags(),
            instance_prompt=args.instance_prompt,
        )
        self.outputs["model_card"] = str(path)
        (self.output_dir / "training_args.json").write_text(
            json.dumps({k: v for k, v in vars(args).items() if not callable(v)}, indent=2, default=str),
            encoding="utf-8",
        )
