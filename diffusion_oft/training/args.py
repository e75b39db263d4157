"""Command-line arguments of the training scripts (flag names of diffusers' own example scripts).

``dreambooth_parser()`` / ``control_parser()`` build the parsers used by ``train_scripts/*.py`` and by
``diffusion-oft train dreambooth|control``; ``finalize_args`` fills the per-method defaults (from the
papers) and checks every input, raising ``ValueError`` with a one-line, actionable message.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..config import AdapterConfig
from ..methods import get_method_class
from ..methods.base import exclusive_fields, field_owners
from .parsers import (  # noqa: F401 (re-exported: the parsers and their tables)
    CONTROL_DEFAULTS,
    DREAMBOOTH_DEFAULTS,
    FF_TARGETS,
    METHODS,
    TEXT_ENCODER_TARGETS,
    control_parser,
    dreambooth_parser,
)


def adapter_config_from_args(args, targets=None, extra_targets=()):
    """The AdapterConfig the flags describe (``targets`` overrides --target_modules)."""
    from ..config import DEFAULT_TARGETS

    own = get_method_class(args.method).exclusive_fields
    fields = {n: getattr(args, n, None) for n in exclusive_fields() if n in own or getattr(args, n, None) is not None}
    structure = {}
    if args.block_size is not None:
        structure["block_size"] = args.block_size
    else:
        structure["num_blocks"] = args.num_blocks
    return AdapterConfig(
        method=args.method,
        **structure,
        **fields,
        target_modules=tuple(targets or args.target_modules or DEFAULT_TARGETS),
        extra_target_modules=tuple(extra_targets),
        attention=args.attention if targets is None else "all",
        cayley_mode=args.cayley_mode,
        dropout=args.adapter_dropout,
        side=getattr(args, "side", "input"),
    )


def _check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0, got {value}")


def finalize_args(args, task: str = "dreambooth"):
    """Fill per-method defaults and check the inputs (ValueError with a one-line message)."""
    method_cls = get_method_class(args.method)
    defaults = method_cls.training_defaults["dreambooth" if task == "dreambooth" else "control"]
    family = _detect_family(args) if task == "dreambooth" else None
    if family is not None:  # DiT widths (1536, 2432, 3072): the library's structure defaults, see README
        defaults = {k: v for k, v in defaults.items() if k != "num_blocks"}
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        args.local_rank = env_rank
    if args.block_size is None and args.num_blocks is None and "num_blocks" in defaults:
        args.num_blocks = defaults["num_blocks"]
    for name in exclusive_fields():  # the fields only some methods read: the method's default, or refused
        neutral = AdapterConfig.__dataclass_fields__[name].default
        value = getattr(args, name, None)
        if name in method_cls.exclusive_fields:
            if value is None:
                setattr(args, name, defaults.get(name, neutral))
        elif value is None:
            setattr(args, name, neutral)
        elif value != neutral:
            owners = " or ".join(field_owners(name))
            raise ValueError(f"--{name} applies to --method {owners} only (got --method {args.method})")
    for name in ("learning_rate", "adam_weight_decay", "adapter_dropout"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if hasattr(args, "train_ff") and args.train_ff is None:
        args.train_ff = defaults["train_ff"]
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = defaults.get("max_train_steps")
        if args.max_train_steps is None:
            args.num_train_epochs = 1
    _check_positive(
        args,
        "resolution",
        "train_batch_size",
        "max_train_steps",
        "num_train_epochs",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "gradient_accumulation_steps",
        "learning_rate",
        "validation_steps",
        "num_inference_steps",
        "block_size",
        "num_blocks",
    )
    if args.num_validation_images < 0:
        raise ValueError(f"--num_validation_images must be >= 0 (0: no images), got {args.num_validation_images}")
    if args.resolution % 8:
        lo, hi = args.resolution // 8 * 8, args.resolution // 8 * 8 + 8
        raise ValueError(f"--resolution must be divisible by 8, got {args.resolution} (try {lo or hi} or {hi})")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if not 0.0 <= args.adapter_dropout < 1.0:
        raise ValueError(f"--adapter_dropout must be in [0, 1), got {args.adapter_dropout}")
    if args.dataloader_num_workers < 0:
        raise ValueError("--dataloader_num_workers must be >= 0")
    if args.report_to not in ("tensorboard", "wandb", "all", "none", "comet_ml", "mlflow"):
        raise ValueError(f"--report_to must be tensorboard, wandb, all or none, got {args.report_to!r}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ValueError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if task == "dreambooth":
        _finalize_dreambooth(args)
        _finalize_dit(args, family)
    else:
        args.guidance_scale = 7.5 if args.guidance_scale is None else args.guidance_scale
        _finalize_control(args)
    return args


def _all_class_images_captioned(args) -> bool:
    from .data import list_images, sidecar_caption

    folder = Path(args.class_data_dir) if args.class_data_dir else None
    if folder is None or not folder.is_dir():
        return False
    images = list_images(folder, "--class_data_dir", strict=getattr(args, "strict", False))[: args.num_class_images]
    return len(images) >= args.num_class_images and all(sidecar_caption(p) for p in images)


def _finalize_dreambooth(args) -> None:
    from .data import list_images

    args.strict = getattr(args, "strict", False)  # namespaces built by hand may lack it
    list_images(args.instance_data_dir, "--instance_data_dir", strict=args.strict)  # checked before any model loads
    if args.with_prior_preservation:
        if args.class_data_dir is None:
            raise ValueError("--with_prior_preservation needs --class_data_dir (missing class images are generated)")
        if args.class_prompt is None and not _all_class_images_captioned(args):
            raise ValueError(
                '--with_prior_preservation needs --class_prompt (e.g. "a photo of a dog"), or '
                f"--num_class_images ({args.num_class_images}) class images in --class_data_dir "
                "with a caption each in <image name>.txt"
            )
        if args.num_class_images < 1:
            raise ValueError(f"--num_class_images must be >= 1, got {args.num_class_images}")
        if args.sample_batch_size < 1:
            raise ValueError(f"--sample_batch_size must be >= 1, got {args.sample_batch_size}")
        if Path(args.class_data_dir).exists() and not Path(args.class_data_dir).is_dir():
            raise ValueError(f"--class_data_dir {args.class_data_dir}: not a folder")
    if args.text_encoder_lr is None:
        args.text_encoder_lr = args.learning_rate
    args.judge = getattr(args, "judge", None)
    if args.judge == "toyworld" and args.resolution != 64:
        raise ValueError(
            f"--judge toyworld judges 64×64 images of the toy world: use --resolution 64, not {args.resolution}"
        )


def _detect_family(args):
    """The flow-matching family of the base model (None: Stable Diffusion); sets ``args.model_family`` and
    ``args.resolved_model_path``."""
    from ..model_paths import resolve_model_path
    from .families import flow_family

    args.resolved_model_path = resolve_model_path(args.pretrained_model_name_or_path)
    family = flow_family(args.resolved_model_path, getattr(args, "revision", None))
    args.model_family = None if family is None else family.name
    return family


def _finalize_dit(args, family) -> None:
    """Family defaults of the DiT flags; refuse them on Stable Diffusion and SD-only flags on DiT models."""
    for name, default in (
        ("weighting_scheme", "logit_normal"),
        ("logit_mean", 0.0),
        ("logit_std", 1.0),
        ("mode_scale", 1.29),
        ("max_sequence_length", None),
        ("precondition_outputs", 0),
        ("train_feed_forward", False),
    ):
        if not hasattr(args, name):  # namespaces built by hand
            setattr(args, name, default)
    if family is None:
        args.guidance_scale = 7.5 if args.guidance_scale is None else args.guidance_scale
        if args.train_feed_forward:
            raise ValueError(
                "--train_feed_forward is for SD3 / Flux transformers; for a UNet list the layers in "
                "--target_modules (e.g. to_q to_k to_v to_out.0 ff.net.0.proj ff.net.2)"
            )
        return
    if args.weighting_scheme is None:
        args.weighting_scheme = family.default_weighting_scheme
    if args.guidance_scale is None:
        args.guidance_scale = family.default_guidance_scale
    if args.max_sequence_length is None:
        args.max_sequence_length = family.default_max_sequence_length
    _check_positive(args, "max_sequence_length")
    what = f"{args.pretrained_model_name_or_path} is a {family.pipeline_classes[0]}"
    if args.train_text_encoder:
        raise ValueError(
            f"--train_text_encoder is not supported for SD3 / Flux ({what}): the adapter goes on the transformer only"
        )
    if args.snr_gamma is not None:
        raise ValueError(f"--snr_gamma weights DDPM losses; {what} (flow matching): use --weighting_scheme")
    if args.noise_offset:
        raise ValueError(f"--noise_offset is for DDPM models; {what} (flow matching)")
    if args.attention != "all":
        raise ValueError(
            f"--attention {args.attention}: SD3 / Flux attention is joint (image + text); "
            "choose layers with --target_modules"
        )
    if args.judge is not None:
        raise ValueError(f"--judge {args.judge} scores adapters of the toy world's SD model, not {what}")


def _finalize_control(args) -> None:
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("give --train_data_dir (image folder with metadata.jsonl) or --dataset_name")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("give --train_data_dir or --dataset_name, not both")
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        raise ValueError(f"--train_data_dir {args.train_data_dir}: no such folder")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if args.encoder_learning_rate is None:
        args.encoder_learning_rate = min(args.learning_rate, 1e-4)
    if args.snr_gamma is not None and args.control_loss_weighting != "epsilon":
        raise ValueError("--snr_gamma weights the epsilon loss: add --control_loss_weighting epsilon")
    if args.controlnet_model_name_or_path and args.control_mode != "controlnet":
        raise ValueError("--controlnet_model_name_or_path needs --control_mode controlnet")
    if args.validation_prompt and args.validation_image:
        n_p, n_i = len(args.validation_prompt), len(args.validation_image)
        if n_p != n_i and 1 not in (n_p, n_i):
            raise ValueError(
                f"{n_i} --validation_image but {n_p} --validation_prompt: give one of each, or one of either"
            )
        for image in args.validation_image:
            if not Path(image).is_file():
                raise ValueError(f"--validation_image {image}: no such file")
    elif args.validation_image and not args.validation_prompt:
        raise ValueError("--validation_image needs --validation_prompt")


def steps_per_epoch(num_examples: int, batch_size: int, num_processes: int, grad_accum: int) -> int:
    """Optimizer steps that one pass over the data takes (at least 1)."""
    return max(1, math.ceil(num_examples / (batch_size * num_processes * grad_accum)))
