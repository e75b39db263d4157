"""The training scripts' argument parsers (flag names of diffusers' own example scripts):
``dreambooth_parser()`` / ``control_parser()``; ``training.args`` fills the defaults and checks the values."""

from __future__ import annotations

import argparse

from ..methods import get_method_class, method_names
from ..methods.base import METHOD_REGISTRY

METHODS = method_names()
# Defaults per method and task, from the papers' Stable Diffusion settings (see README, "Train a subject"):
# each method's class states them (``training_defaults``); these are views of those.
DREAMBOOTH_DEFAULTS: dict[str, dict] = {n: get_method_class(n).training_defaults["dreambooth"] for n in METHODS}
CONTROL_DEFAULTS: dict[str, dict] = {n: get_method_class(n).training_defaults["control"] for n in METHODS}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FF_TARGETS = ("ff.net.0.proj", "ff.net.2")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="base model: a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a local folder",
    )
    g.add_argument("--revision", default=None, help="revision of the base model on the hub")
    g.add_argument("--variant", default=None, help="weights variant of the base model, e.g. fp16")
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="another VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)",
    )


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--method", default="oft", choices=METHODS, help="orthogonal adapter method (default: oft)")
    g.add_argument("--block_size", type=int, default=None, help="block size b (give this or --num_blocks)")
    per_method = ", ".join(f"{n} {d['num_blocks']}" for n, d in DREAMBOOTH_DEFAULTS.items())
    g.add_argument(
        "--num_blocks", type=int, default=None, help=f"number of blocks n per layer (default per method: {per_method})"
    )
    added: set[str] = set()
    for cls in METHOD_REGISTRY.values():  # the flags of the fields only some methods read (their classes say)
        for name, kwargs in cls.cli_options.items():
            if name not in added:
                added.add(name)
                g.add_argument(f"--{name}", default=None, **kwargs)
    g.add_argument(
        "--target_modules",
        nargs="+",
        default=None,
        help="attention projections to adapt (default: to_q to_k to_v to_out.0; SD3 / Flux: also "
        "add_q_proj add_k_proj add_v_proj to_add_out, and Flux's single blocks' to_q/k/v)",
    )
    g.add_argument(
        "--attention",
        default="all",
        choices=["self", "cross", "all"],
        help="which attention modules' projections get adapters (default: all)",
    )
    g.add_argument(
        "--adapter_dropout",
        type=float,
        default=None,
        help="multiplicative block dropout of the adapter (default: boft 0.1, others 0)",
    )
    g.add_argument(
        "--cayley_mode",
        default="exact",
        choices=["exact", "neumann"],
        help="Cayley transform of oft/boft: exact solve or Neumann series (OFTv2)",
    )
    g.add_argument(
        "--side",
        default="input",
        choices=["input", "output"],
        help="which side of each weight the transform acts on: input (papers, PEFT; default) or output "
        "(kohya/LyCORIS: needed for `convert --to kohya`)",
    )
    g.add_argument("--adapter_name", default="default", help="name of the adapter inside the file")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="diffusion-oft-model", help="where the adapter, samples and checkpoints go")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, noise, validation (default 0)")
    g.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (divisible by 8)")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of a random crop")
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size per device")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (default per method)")
    g.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help="epochs over the data; used only when --max_train_steps is not given",
    )
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="save accelerate state + adapter to checkpoint-<step> every N steps",
    )
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='a checkpoint-<step> folder (or its name in --output_dir), or "latest"',
    )
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for memory")
    g.add_argument("--learning_rate", type=float, default=None, help="learning rate (default per method)")
    g.add_argument(
        "--scale_lr",
        action="store_true",
        help="multiply the learning rate by accumulation steps x batch size x processes",
    )
    g.add_argument(
        "--lr_scheduler",
        default="constant",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"',
    )
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial scheduler")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=None, help="default: ether/ether_plus 0, others 1e-2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument(
        "--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's config (no)"
    )
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    g.add_argument("--snr_gamma", type=float, default=None, help="min-SNR loss weighting (5.0 is common)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="noise offset (e.g. 0.05)")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none"')
    g.add_argument("--logging_dir", default="logs", help="tensorboard folder, relative to --output_dir")


def _add_validation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", nargs="+", default=None, help="prompt(s) for validation images")
    g.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="images per validation prompt (0: none, and no samples.png at the end)",
    )
    g.add_argument("--validation_steps", type=int, default=100, help="validate every N steps (and at the end)")
    g.add_argument("--num_inference_steps", type=int, default=25, help="denoising steps of validation images")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance of validation (default 7.5; SD3 7.0); FLUX.1-dev: the value fed to "
        "its guidance embedding in training and validation (default 3.5; schnell has none)",
    )


def _add_dit_args(p: argparse.ArgumentParser) -> None:
    from .flow import add_flow_matching_args

    g = p.add_argument_group("SD3 / SD3.5 and FLUX.1 (flow-matching DiT models, detected from the model folder)")
    add_flow_matching_args(g, default_scheme=None)
    g.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 tokens of the prompt (default: SD3 77, Flux 512, as diffusers' DreamBooth scripts)",
    )
    g.add_argument(
        "--precondition_outputs",
        type=int,
        default=0,
        choices=[0, 1],
        help="1: the loss on the x estimate pred·(−σ) + x_σ against x (diffusers' SD3 option); "
        "0 (default): on the velocity ε − x",
    )
    g.add_argument(
        "--train_feed_forward",
        action="store_true",
        help="also adapt the transformer's feed-forward: ff / ff_context MLPs, Flux's single-block "
        "proj_mlp and proj_out",
    )


def dreambooth_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_dreambooth.py",
        description="Teach a subject to a text-to-image model with an orthogonal adapter (DreamBooth-style).",
        add_help=add_help,
    )
    _add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", required=True, help="folder with the subject's photos")
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop on a file of the data folders that is not a readable image (default: skip it "
        "with a warning that counts them)",
    )
    g.add_argument(
        "--instance_prompt",
        required=True,
        help='e.g. "a photo of sks dog"; an instance image with a caption in <image name>.txt (kohya\'s '
        "convention) is trained with that caption instead",
    )
    g.add_argument("--class_data_dir", default=None, help="folder of class images (generated when too few)")
    g.add_argument("--class_prompt", default=None, help='e.g. "a photo of a dog"')
    g.add_argument("--with_prior_preservation", action="store_true", help="add the prior-preservation loss")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument(
        "--num_class_images",
        type=int,
        default=100,
        help="class images wanted; missing ones are generated with the base model",
    )
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    g.add_argument("--class_inference_steps", type=int, default=25, help="denoising steps of class images")
    g.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="also put the adapter on the text encoder(s)' q/k/v/out projections",
    )
    g.add_argument("--text_encoder_lr", type=float, default=None, help="default: --learning_rate")
    g.add_argument(
        "--no_cache_latents",
        dest="cache_latents",
        action="store_false",
        help="encode the images with the VAE at every step instead of once (the cache is on by default "
        "and gives the same latents; it is skipped by itself for random crops of non-square images)",
    )
    g.add_argument(
        "--cache_latents",
        dest="cache_latents",
        action="store_true",
        default=True,
        help="diffusers' spelling; on by default",
    )
    _add_dit_args(p)
    _add_adapter_args(p)
    _add_training_args(p)
    _add_validation_args(p)
    p.add_argument_group("validation").add_argument(
        "--judge",
        default=None,
        choices=["toyworld"],
        help="after training, score the adapter with the toy world's judge (subject fidelity, prompt fidelity, "
        "prior preservation vs the base model; for assets/toy-sd and assets/subject) and print the figures",
    )
    return p


def control_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_control.py",
        description="Teach a text-to-image model to follow a spatial condition with orthogonal adapters.",
        add_help=add_help,
    )
    _add_model_args(p)
    g = p.add_argument_group("control")
    g.add_argument(
        "--control_mode",
        default="encoder",
        choices=["encoder", "controlnet"],
        help="encoder: condition encoder after conv_in + adapters on the UNet (papers' setup); "
        "controlnet: a ControlNetModel whose attention carries the adapters",
    )
    g.add_argument(
        "--controlnet_model_name_or_path",
        default=None,
        help="controlnet mode: start from this pretrained ControlNet (default: a copy of the UNet)",
    )
    g.add_argument(
        "--condition",
        default="none",
        choices=["none", "canny", "sketch", "grayscale"],
        help="build the condition from the target image on the fly (none: read it from the data)",
    )
    g.add_argument("--canny_low_threshold", type=float, default=100.0)
    g.add_argument("--canny_high_threshold", type=float, default=200.0)
    g.add_argument(
        "--train_ff",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also adapt the feed-forward projections (default: on for ether/ether_plus)",
    )
    g.add_argument(
        "--encoder_learning_rate",
        type=float,
        default=None,
        help="learning rate of the condition encoder (default: min(--learning_rate, 1e-4))",
    )
    g.add_argument(
        "--control_encoder",
        default="hint",
        choices=["hint", "slim"],
        help="encoder mode: the condition encoder's design: hint (ControlNet's hint encoder widths "
        "16/32/96(/256) with 3x3 zero-initialised heads; default) or slim (widths 8/16/32(/64), "
        "depthwise-separable downsamplers, 1x1 heads: ~1/20 of the parameters)",
    )
    g.add_argument(
        "--control_injection",
        default="multiscale",
        choices=["multiscale", "conv_in"],
        help="encoder mode: add the condition's features after conv_in and every downsampler "
        "(multiscale, default) or after conv_in only",
    )
    g.add_argument(
        "--timestep_bias",
        default="cubic",
        choices=["cubic", "none"],
        help="training timesteps: cubic, t = (1 - u^3) T (T2I-Adapter; 79%% of them in the noisier "
        "half, where the layout is decided), or none (uniform)",
    )
    g.add_argument(
        "--control_loss_weighting",
        default="v",
        choices=["v", "epsilon"],
        help="v: MSE measured in v-space (an epsilon model's loss times 1 + 1/SNR, so the "
        "high-noise steps count); epsilon: the plain loss on the model's target (with --snr_gamma)",
    )
    g.add_argument(
        "--no_cache_latents",
        dest="cache_latents",
        action="store_false",
        help="encode the images with the VAE at every step instead of once (the cache is on by default "
        "and gives the same latents; it is skipped by itself for random crops of non-square images)",
    )
    g.add_argument("--cache_latents", dest="cache_latents", action="store_true", default=True, help="on by default")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="a datasets dataset: local path (save_to_disk) or hub name")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="an image folder with metadata.jsonl")
    g.add_argument("--image_column", default="image")
    g.add_argument("--conditioning_image_column", default="conditioning_image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument(
        "--proportion_empty_prompts", type=float, default=0.0, help="fraction of captions replaced by the empty prompt"
    )
    g.add_argument(
        "--validation_image",
        nargs="+",
        default=None,
        help="condition image(s) for validation (or plain images with --condition)",
    )
    _add_adapter_args(p)
    _add_training_args(p)
    _add_validation_args(p)
    p.set_defaults(checkpointing_steps=500, num_validation_images=2)
    return p
