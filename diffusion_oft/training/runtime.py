"""The run's accelerate and optimizer set-up (``AdapterTrainer.build_accelerator`` / ``make_optimizer``)."""

from __future__ import annotations

from pathlib import Path

import torch


def build_accelerator(args, output_dir: Path):
    """The accelerate ``Accelerator`` of a run: mixed precision, trackers (checked installed), project dirs."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to == "none" else args.report_to
    if report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            if report_to == "all":
                raise ValueError("--report_to all needs tensorboard: pip install tensorboard") from None
            print("tensorboard is not installed (pip install tensorboard): logging disabled", flush=True)
            report_to = args.report_to = "none"
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=report_to, project_config=project_config)
    if args.report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--report_to wandb needs wandb: pip install wandb") from None
    return accelerator


def make_optimizer(args, groups: list[dict]):
    """AdamW (or bitsandbytes' 8-bit AdamW) over the parameter groups, with the --adam_* flags."""
    kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
