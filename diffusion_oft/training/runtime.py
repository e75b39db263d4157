"""The run's set-up and bookkeeping: accelerator, optimizer, weight dtypes, trainable adapter parameters,
the loss log (``AdapterTrainer.build_accelerator`` / ``make_optimizer`` / ``flush_logs``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..model import adapter_configs, adapter_parameters, ortho_layers


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


def weight_dtype_of(mixed_precision: str | None) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def cast_trainable_to_fp32(module: nn.Module) -> None:
    """Adapter parameters (and other trainable ones) stay float32 under fp16/bf16 weights."""
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def adapted_layer_count(module: nn.Module) -> int:
    return len(ortho_layers(module))


def trainable_adapter_params(module: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    if adapter_name not in adapter_configs(module):
        return []
    return [p for p in adapter_parameters(module, adapter_name) if p.requires_grad]


def flush_logs(trainer, pending: list[dict], progress) -> None:
    """Read the losses of the steps since the last flush (one host sync for all of them), stop on a
    non-finite one, and log them.  Called before anything is written (checkpoints, validation, the
    adapter), so a NaN step still leaves no file behind; ``pending`` is emptied."""
    if not pending:
        return
    keys = sorted({k for entry in pending for k in entry["logs"]})
    # (steps, keys) on the device; missing parts (e.g. no prior loss) as NaN placeholders, then dropped
    device = trainer.accelerator.device
    values = torch.stack(
        [
            torch.stack(
                [torch.as_tensor(entry["logs"].get(k, float("nan")), dtype=torch.float32, device=device) for k in keys]
            )
            for entry in pending
        ]
    )
    micro_losses = [(entry, micro, loss) for entry in pending for micro, loss in entry["micro_losses"]]
    # per micro-batch: (loss value as float32, 1 if not finite); the mean keeps a NaN / inf visible
    checks = torch.stack(
        [torch.stack([loss.float().mean(), (~torch.isfinite(loss)).any().float()]) for _, _, loss in micro_losses]
    ).to(device)
    if trainer.accelerator.num_processes > 1:
        loss_col = keys.index("loss")
        values[:, loss_col] = trainer.accelerator.reduce(values[:, loss_col].contiguous(), "mean")
        checks[:, 1] = trainer.accelerator.reduce(checks[:, 1].contiguous(), "sum")  # any rank's NaN stops all
    rows, checks = values.tolist(), checks.tolist()  # the one host sync
    entries = list(pending)
    pending.clear()
    for (entry, micro, _), (value, bad) in zip(micro_losses, checks, strict=True):
        if bad:
            trainer._raise_non_finite(value, entry["step"], micro)
    for entry, row in zip(entries, rows, strict=True):
        logs = {k: v for k, v in zip(keys, row, strict=True) if k in entry["logs"]}
        logs["lr"] = entry["lr"]
        trainer.history.append({"step": entry["step"], **logs})
        trainer.accelerator.log(logs, step=entry["step"])
    last = trainer.history[-1]
    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")


# ---- the run -----------------------------------------------------------------------------------
