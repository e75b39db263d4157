"""DreamBooth on flow-matching DiT models (SD3 / SD3.5, FLUX.1 dev and schnell).

The loop, data, latent cache, prior preservation, checkpoints, validation and model card are the SD
trainer's (:class:`~diffusion_oft.training.dreambooth.DreamBoothTrainer`); what differs per model lives in
its family (``training/families.py``) and the step is :func:`flow_matching_step`.  The adapter goes on
the transformer only (text encoders are not trained for DiT models: T5 stays frozen, and so do the CLIPs).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..config import default_target_modules
from ..model import add_adapter
from .args import adapter_config_from_args
from .data import BadDataWarning, DreamBoothDataset, collate_dreambooth, list_images, sidecar_caption
from .families import FlowFamily, feed_forward_targets
from .flow import flow_matching_loss, noisy_latents, sample_flow_timesteps
from .latents import scale_latents
from .loop import cast_trainable_to_fp32, trainable_adapter_params
from .loss import sample_noise
from .models import to_device
from .subject import DreamBoothTrainer, check_fits


def flow_matching_step(
    family: FlowFamily,
    transformer: nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    generator: torch.Generator,
    args,
    num_instance: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One flow-matching loss on scaled latents (B, C, h, w): noise and noise levels from ``generator``
    (CPU, so a resumed run draws the same ones), x_σ = (1 − σ)x + σε, velocity target ε − x, weighted by
    ``args.weighting_scheme``.  With ``num_instance`` < B the rest are class images (prior preservation):
    loss = instance loss + prior_loss_weight · prior loss; the parts are returned detached."""
    noise = sample_noise(latents, generator)
    timesteps, sigmas = sample_flow_timesteps(
        scheduler,
        latents.shape[0],
        args.weighting_scheme,
        args.logit_mean,
        args.logit_std,
        args.mode_scale,
        generator=generator,
        device=latents.device,
    )
    noisy = noisy_latents(latents, noise, sigmas)
    pred = family.predict(transformer, noisy, timesteps, cond, args.guidance_scale)
    per_sample = flow_matching_loss(
        pred,
        latents,
        noise,
        sigmas,
        args.weighting_scheme,
        precondition_outputs=bool(args.precondition_outputs),
        reduction="none",
    )  # (B,) float32
    if num_instance is None or num_instance >= latents.shape[0]:
        loss = per_sample.mean()
        return loss, {"loss": loss.detach()}
    inst, prior = per_sample[:num_instance].mean(), per_sample[num_instance:].mean()
    loss = inst + args.prior_loss_weight * prior
    return loss, {"loss": loss.detach(), "instance_loss": inst.detach(), "prior_loss": prior.detach()}


class DiTDreamBoothTrainer(DreamBoothTrainer):
    """DreamBooth for a :class:`FlowFamily` model: the adapter on its transformer."""

    project_name = "dreambooth-oft-dit"

    def __init__(self, args, family: FlowFamily):
        super().__init__(args)
        self.family = family

    def setup(self) -> None:
        args, accelerator = self.args, self.accelerator
        device, dtype = accelerator.device, self.weight_dtype
        family = self.family
        self.pipe = pipe = family.load_pipeline(args.resolved_model_path, args.revision, args.variant)
        if args.pretrained_vae_model_name_or_path:
            from diffusers import AutoencoderKL

            pipe.vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
        family.check_resolution(pipe, args.resolution)
        transformer = pipe.transformer
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
        # the scheduler's training state (all num_train_timesteps); the pipeline's copy is changed by inference
        self.noise_scheduler = copy.deepcopy(pipe.scheduler)
        targets = args.target_modules or default_target_modules(transformer)
        extra = feed_forward_targets(transformer) if args.train_feed_forward else ()
        self.unet_config = adapter_config_from_args(args, targets=targets, extra_targets=extra)
        check_fits(transformer, self.unet_config, "transformer")
        with warnings.catch_warnings():  # already reported by finalize_args
            warnings.simplefilter("ignore", BadDataWarning)
            instance_images = list_images(args.instance_data_dir, "--instance_data_dir", strict=args.strict)
        to_device(pipe.vae, device, torch.float32)  # the VAE stays float32 (encode once, cached)
        for encoder in family.text_encoders(pipe):
            to_device(encoder, device, dtype)
        to_device(transformer, device, dtype)
        class_images = self.prepare_class_images() if args.with_prior_preservation else None

        add_adapter(transformer, self.unet_config, args.adapter_name)
        cast_trainable_to_fp32(transformer)
        self.trained_encoders = []
        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if args.enable_xformers_memory_efficient_attention:
            transformer.enable_xformers_memory_efficient_attention()
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
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.latent_cache = self.build_latent_cache()

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    def make_pipeline(self):
        pipe = self.pipe
        pipe.scheduler = type(self.noise_scheduler).from_config(self.noise_scheduler.config)  # fresh for inference
        return pipe

    # ---- the trainer interface ---------------------------------------------------------------------
    def adapted_components(self) -> dict[str, nn.Module]:
        return {"transformer": self.pipe.transformer}

    def trainable_modules(self) -> list[nn.Module]:
        return [self.pipe.transformer]

    def param_groups(self) -> list[dict]:
        params = trainable_adapter_params(self.pipe.transformer, self.args.adapter_name)
        return [{"params": params, "lr": self.args.learning_rate}]

    def on_prepared(self, modules: list[nn.Module]) -> None:
        self.train_transformer = modules[0]

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning of ``prompts``: one encoder pass per distinct prompt, then cached (frozen)."""
        cache, device = self._prompt_cache, self.accelerator.device
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            if len(cache) + len(missing) > 4096:
                cache.clear()
                missing = list(dict.fromkeys(prompts))
            cond = self.family.encode_prompts(self.pipe, missing, self.args.max_sequence_length, device)
            for i, prompt in enumerate(missing):
                cache[prompt] = {k: v if k == "txt_ids" else v[i : i + 1] for k, v in cond.items()}
        first = cache[prompts[0]]
        return {
            k: v if k == "txt_ids" else torch.cat([cache[p][k] for p in prompts]).to(self.weight_dtype)
            for k, v in first.items()
        }

    def compute_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        args, dtype = self.args, self.weight_dtype
        with torch.no_grad():
            if self.latent_cache is not None:  # the same sample as an uncached run: same parameters, generator
                dist = self.latent_cache.distribution(batch["image_paths"])
            else:
                pixels = batch["pixel_values"].to(device=self.vae.device, dtype=self.vae.dtype)
                dist = self.vae.encode(pixels).latent_dist
            latents = scale_latents(self.vae, dist.sample(generator=generator)).to(dtype)
        n_inst = batch["num_instance"]
        captions = batch.get("class_captions") or [None] * (latents.shape[0] - n_inst)
        instance_captions = batch.get("instance_captions") or [None] * n_inst
        prompts = [c or args.instance_prompt for c in instance_captions] + [c or args.class_prompt for c in captions]
        return flow_matching_step(
            self.family,
            self.train_transformer,
            self.noise_scheduler,
            latents,
            self.encode(prompts),
            generator,
            args,
            num_instance=n_inst if args.with_prior_preservation else None,
        )

    # ---- validation, outputs -----------------------------------------------------------------------
    def pipeline_kwargs(self) -> dict:
        return {"max_sequence_length": self.args.max_sequence_length}

    def pipeline_class_name(self) -> str:
        return type(self.pipe).__name__

    def model_tags(self) -> list[str]:
        return list(self.family.hub_tags)

    def training_summary(self) -> dict:
        summary = super().training_summary()
        summary.update(model_family=self.family.name, weighting_scheme=self.args.weighting_scheme)
        return summary
