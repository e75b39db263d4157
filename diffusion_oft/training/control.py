"""Control training (``train_scripts/train_control.py``): a condition encoder + orthogonal adapters on
the UNet (``--control_mode encoder``, the OFT/BOFT papers' setup), or a ControlNet whose attention
carries the adapters (``--control_mode controlnet``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..control import (
    ENCODER_FILE,
    ControlledUNet,
    condition_encoder_for,
    default_channels,
    load_condition_encoder,
    save_condition_encoder,
)
from ..model import add_adapter, count_adapter_parameters
from .args import FF_TARGETS, adapter_config_from_args, control_parser, finalize_args
from .control_data import ControlDataset, collate_control, records_from_dataset, records_from_folder
from .latents import LatentCache, cache_dataset_latents, scale_latents
from .loop import ADAPTER_FILE, AdapterTrainer, cast_trainable_to_fp32, trainable_adapter_params
from .loss import diffusion_loss, sample_noise, sample_timesteps, training_target
from .models import encode_prompts_cached, load_base_model, sdxl_time_ids, to_device
from .subject import check_fits, encode_latents, vae_dtype
from .validation import image_grid

CONTROLNET_EXTRAS_FILE = "controlnet_extras.safetensors"
CONTROLNET_TRAINED_PARTS = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


class ControlNetUNet(nn.Module):
    """ControlNet + frozen UNet as one module (one DDP wrapper)."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, sample, timestep, encoder_hidden_states, condition, control_scale: float = 1.0, **kwargs):
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=condition,
            conditioning_scale=control_scale,
            return_dict=False,
            **kwargs,
        )
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **kwargs,
        )


def controlnet_extras(controlnet: nn.Module) -> dict[str, torch.Tensor]:
    """The fully trained parts of a ControlNet made from the UNet (hint encoder and zero convs)."""
    return {
        k: v.detach().float().cpu().contiguous()
        for k, v in controlnet.state_dict().items()
        if k.split(".")[0] in CONTROLNET_TRAINED_PARTS
    }


def load_controlnet_extras(controlnet: nn.Module, path: str | Path) -> None:
    """Load ``controlnet_extras.safetensors`` into a ControlNetModel.from_unet(...) (controlnet mode)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    missing, unexpected = controlnet.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{Path(path).name}: unexpected tensors {unexpected[:3]}")
    expected = set(controlnet_extras(controlnet))
    if not expected <= set(tensors):
        raise ValueError(f"{Path(path).name}: missing tensors {sorted(expected - set(tensors))[:3]}")


class ControlTrainer(AdapterTrainer):
    task = "control"
    project_name = "control-oft"

    def setup(self) -> None:
        args, accelerator = self.args, self.accelerator
        device, dtype = accelerator.device, self.weight_dtype
        extra = FF_TARGETS if args.train_ff else ()
        self.config = adapter_config_from_args(args, extra_targets=extra)
        need_condition = args.condition == "none"
        if args.train_data_dir:
            records = records_from_folder(
                args.train_data_dir,
                args.image_column,
                args.conditioning_image_column,
                args.caption_column,
                need_condition,
            )
        else:
            records = records_from_dataset(
                args.dataset_name,
                args.dataset_config_name,
                args.image_column,
                args.conditioning_image_column,
                args.caption_column,
                need_condition,
            )
        if args.max_train_samples:
            from .control_data import ControlRecords

            n = min(args.max_train_samples, len(records))
            records = ControlRecords(items=[records[i] for i in range(n)])
        self.dataset = ControlDataset(
            records,
            args.resolution,
            args.center_crop,
            args.seed,
            args.condition,
            args.proportion_empty_prompts,
            (args.canny_low_threshold, args.canny_high_threshold),
        )
        self.collate_fn = collate_control
        self.base = base = load_base_model(args)  # after the data checks: a wrong folder fails fast
        to_device(base.vae, device, vae_dtype(base, args, dtype))
        for encoder in base.text_encoders:
            to_device(encoder, device, dtype)
        to_device(base.unet, device, dtype)
        if args.control_mode == "encoder":
            check_fits(base.unet, self.config, "unet")
            add_adapter(base.unet, self.config, args.adapter_name)
            self.encoder = condition_encoder_for(
                base.unet, base.vae_scale_factor, injection=args.control_injection, design=args.control_encoder
            ).to(device)
            self.adapted = base.unet
            self.model = ControlledUNet(base.unet, self.encoder)
            self.extra_params = list(self.encoder.parameters())
        else:
            from diffusers import ControlNetModel

            if args.controlnet_model_name_or_path:
                controlnet = ControlNetModel.from_pretrained(args.controlnet_model_name_or_path)
                self.from_unet = False
            else:
                controlnet = ControlNetModel.from_unet(
                    base.unet, conditioning_embedding_out_channels=default_channels(base.vae_scale_factor)
                )
                self.from_unet = True
            controlnet.requires_grad_(False)
            to_device(controlnet, device, dtype)
            check_fits(controlnet, self.config, "controlnet")
            add_adapter(controlnet, self.config, args.adapter_name)
            self.extra_params = []
            if self.from_unet:  # new hint encoder and zero convs: trained in full (small)
                for part in CONTROLNET_TRAINED_PARTS:
                    getattr(controlnet, part).requires_grad_(True)
                    self.extra_params += list(getattr(controlnet, part).parameters())
            self.encoder = None
            self.controlnet = controlnet
            self.adapted = controlnet
            self.model = ControlNetUNet(base.unet, controlnet)
        cast_trainable_to_fp32(self.model)
        if args.gradient_checkpointing:
            self.adapted.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            self.adapted.enable_xformers_memory_efficient_attention()
        self._prompt_cache: dict[str, tuple] = {}
        self.latent_cache = self.build_latent_cache()

    def build_latent_cache(self) -> LatentCache | None:
        """The VAE's output for every training image, when the crops do not change between steps
        (as the DreamBooth trainer's: same latents as encoding every step, sampled with the step's
        generator)."""
        args, dataset = self.args, self.dataset
        return cache_dataset_latents(
            self.base.vae, dataset, args, self.log, range(len(dataset)), args.train_batch_size, dataset.fingerprint
        )

    # ---- trainer interface -------------------------------------------------------------------------
    def adapted_components(self) -> dict[str, nn.Module]:
        return {"unet" if self.args.control_mode == "encoder" else "controlnet": self.adapted}

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model]

    def set_train_mode(self, training: bool) -> None:
        self.adapted.train(training)
        if self.encoder is not None:
            self.encoder.train(training)
        if self.args.control_mode == "controlnet":
            self.controlnet.train(training)

    def param_groups(self) -> list[dict]:
        groups = [
            {"params": trainable_adapter_params(self.adapted, self.args.adapter_name), "lr": self.args.learning_rate}
        ]
        if self.extra_params:
            groups.append({"params": self.extra_params, "lr": self.args.encoder_learning_rate})
        return groups

    def on_prepared(self, modules: list[nn.Module]) -> None:
        self.train_model = modules[0]

    def encode(self, texts: list[str]):
        return encode_prompts_cached(self.base, texts, self._prompt_cache)  # the text encoders are frozen

    def compute_loss(self, batch: dict, generator: torch.Generator):
        args, base = self.args, self.base
        device, dtype = self.accelerator.device, self.weight_dtype
        with torch.no_grad():
            if self.latent_cache is not None:  # same sample as encode_latents: same parameters, same generator
                dist = self.latent_cache.distribution(batch["indices"])
                latents = scale_latents(base.vae, dist.sample(generator=generator)).to(dtype)
            else:
                latents = encode_latents(base.vae, batch["pixel_values"], generator).to(dtype)
        noise = sample_noise(latents, generator, args.noise_offset)
        timesteps = sample_timesteps(latents.shape[0], base.noise_scheduler, generator, device, args.timestep_bias)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = self.encode(batch["texts"])
        kwargs = {}
        if base.is_sdxl:
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], args.resolution, device, dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        cond = batch["conditioning"].to(device=device, dtype=dtype)
        pred = self.train_model(noisy, timesteps, embeds.to(dtype), cond, **kwargs).sample
        target = training_target(base.noise_scheduler, latents, noise, timesteps)
        space = None if args.control_loss_weighting == "epsilon" else args.control_loss_weighting
        return diffusion_loss(pred, target, timesteps, base.noise_scheduler, args.snr_gamma, loss_space=space)

    # ---- files -------------------------------------------------------------------------------------
    def extra_metadata(self) -> dict[str, str]:
        meta = {"control_mode": self.args.control_mode, "control_condition": self.args.condition}
        if self.args.control_mode == "encoder":
            meta["condition_encoder"] = ENCODER_FILE
        elif self.from_unet:
            meta["controlnet_extras"] = CONTROLNET_EXTRAS_FILE
        return meta

    def save_extra(self, directory: Path) -> None:
        if self.encoder is not None:
            save_condition_encoder(
                self.encoder,
                directory / ENCODER_FILE,
                paired_adapter=directory / ADAPTER_FILE,
                extra_metadata={"control_condition": self.args.condition},
            )
        elif self.from_unet:
            from ..files import atomic_save_file

            atomic_save_file(
                controlnet_extras(self.controlnet),
                directory / CONTROLNET_EXTRAS_FILE,
                {"format": "diffusion-oft-controlnet-extras", "paired_adapter": ADAPTER_FILE},
            )

    @torch.no_grad()
    def load_extra(self, directory: Path) -> None:
        if self.encoder is not None:
            encoder, _ = load_condition_encoder(directory / ENCODER_FILE)
            self.encoder.load_state_dict(encoder.state_dict())
        elif self.from_unet:
            load_controlnet_extras(self.controlnet, directory / CONTROLNET_EXTRAS_FILE)

    # ---- validation --------------------------------------------------------------------------------
    def validation_pairs(self) -> list[tuple]:
        """[(condition PIL, prompt)]: the --validation_image/--validation_prompt pairs, or the first examples."""
        from ..conditions import make_condition
        from .data import load_rgb

        args = self.args
        if args.validation_image:
            images, prompts = list(args.validation_image), list(args.validation_prompt)
            n = max(len(images), len(prompts))
            images, prompts = images * (n // len(images)), prompts * (n // len(prompts))
            pairs = []
            for path, prompt in zip(images, prompts, strict=True):
                img = load_rgb(path).resize((args.resolution, args.resolution))
                cond = (
                    img
                    if args.condition == "none"
                    else make_condition(img, args.condition, args.canny_low_threshold, args.canny_high_threshold)
                )
                pairs.append((cond, prompt))
            return pairs
        from PIL import Image

        pairs = []
        for i in range(min(2, len(self.dataset))):
            item = self.dataset[(i, 0)]
            cond = Image.fromarray((item["conditioning"].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            prompt = (args.validation_prompt or [item["text"]])[0]
            pairs.append((cond, prompt))
        return pairs

    def wants_validation(self) -> bool:
        return bool(self.args.validation_prompt or self.args.validation_image)

    def validation_grid(self, final: bool):
        args = self.args
        pipe = control_pipeline(self)
        rows, images = [], []
        for cond, prompt in self.validation_pairs():
            out = pipe(
                prompt,
                num_images_per_prompt=args.num_validation_images,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=torch.Generator().manual_seed(args.seed),
                image=cond,
            ).images
            rows.append([cond, *out])
            images.extend(out)
        labels = [p for _, p in self.validation_pairs()]
        return image_grid(rows, labels=labels), images

    def write_model_card(self) -> None:
        from .model_card import write_model_card

        args = self.args
        n_adapter = count_adapter_parameters(self.adapted, args.adapter_name)
        n_extra = sum(p.numel() for p in self.extra_params)
        what = "condition encoder" if args.control_mode == "encoder" else "ControlNet hint encoder + zero convs"
        condition = args.condition if args.condition != "none" else "from the data"
        summary = (
            f"A {args.method.upper()} control adapter for `{args.pretrained_model_name_or_path}` "
            f"({args.control_mode} mode, condition: {condition})."
        )
        rows = [
            ("base model", f"`{args.pretrained_model_name_or_path}`"),
            ("control mode", args.control_mode),
            ("method", args.method),
            ("trainable parameters", f"adapter {n_adapter:,}; {what} {n_extra:,}"),
            (
                "steps",
                f"{self.global_step} (batch {args.train_batch_size}, accumulation "
                f"{args.gradient_accumulation_steps}, {self.accelerator.num_processes} process(es))",
            ),
            ("learning rate", f"adapter {args.learning_rate:g}, {what} {args.encoder_learning_rate:g}"),
            ("resolution", str(args.resolution)),
            ("training examples", str(len(self.dataset))),
        ]
        if args.control_mode == "encoder":
            usage = f"""
from diffusion_oft.pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

pipe = OrthoStableDiffusionControlPipeline.from_pretrained("{args.pretrained_model_name_or_path}", control=".")
image = pipe("a prompt", image=condition_image).images[0]
"""
        else:
            usage = f"""
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
import diffusion_oft
from diffusion_oft.training.control import load_controlnet_extras

base = "{args.pretrained_model_name_or_path}"
pipe = StableDiffusionControlNetPipeline.from_pretrained(base, controlnet=ControlNetModel.from_unet(...))
load_controlnet_extras(pipe.controlnet, "{CONTROLNET_EXTRAS_FILE}")  # when trained from the UNet
diffusion_oft.load_adapter(pipe, "{ADAPTER_FILE}")
"""
        path = write_model_card(
            self.output_dir,
            args.pretrained_model_name_or_path,
            f"{args.method.upper()} control adapter",
            summary,
            rows,
            {k: v.ortho_adapter_configs[args.adapter_name].to_dict() for k, v in self.adapted_components().items()},
            "samples.png" if "samples" in self.outputs else None,
            None,
            usage,
            tags=[
                "text-to-image",
                "diffusion-oft",
                args.method,
                "controlnet" if args.control_mode == "controlnet" else "control",
                f"condition-{args.condition}",
            ],
        )
        self.outputs["model_card"] = str(path)
        (self.output_dir / "training_args.json").write_text(
            json.dumps({k: v for k, v in vars(args).items() if not callable(v)}, indent=2, default=str),
            encoding="utf-8",
        )


def control_pipeline(trainer: ControlTrainer):
    """An inference pipeline around the trainer's live (unwrapped) components."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline

    from ..pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

    base = trainer.base
    if base.is_sdxl:
        raise ValueError("validation images for SDXL control runs are not supported yet; omit --validation_prompt")
    scheduler = DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config)
    common = dict(
        vae=base.vae,
        text_encoder=base.text_encoders[0],
        tokenizer=base.tokenizers[0],
        unet=base.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if trainer.args.control_mode == "encoder":
        pipe = OrthoStableDiffusionControlPipeline(**common)
        pipe.set_condition_encoder(trainer.encoder)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=trainer.controlnet, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None, args=None) -> dict:
    from ..console import setup_console

    setup_console()
    if args is None:
        args = control_parser().parse_args(argv)
    finalize_args(args, "control")
    return ControlTrainer(args).run()
