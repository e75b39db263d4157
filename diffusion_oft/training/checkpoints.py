"""Checkpoints: ``<output_dir>/checkpoint-<step>`` folders with accelerate's state (optimizer, lr
scheduler, RNG) and the adapter file(s) instead of full model weights; pruning; ``latest``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..model import named_ortho_layers

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-<step> folders of ``output_dir``, oldest (smallest step) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    match = CHECKPOINT_RE.match(Path(path).name)
    if not match:
        raise ValueError(f"{path}: not a checkpoint-<step> folder")
    return int(match.group(1))


def resolve_checkpoint(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """The folder to resume from: None (fresh run; also for "latest" without checkpoints) or a path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        path = Path(output_dir) / resume_from
    if not path.is_dir():
        existing = [p.name for p in list_checkpoints(output_dir)]
        raise ValueError(
            f"--resume_from_checkpoint {resume_from}: no such checkpoint folder "
            f"(checkpoints in {output_dir}: {existing or 'none'}; or use 'latest')"
        )
    checkpoint_step(path)
    return path


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Before saving a new checkpoint: remove the oldest so that at most ``total_limit`` remain after it."""
    if not total_limit:
        return []
    found = list_checkpoints(output_dir)
    excess = len(found) - total_limit + 1
    removed = found[:excess] if excess > 0 else []
    for path in removed:
        shutil.rmtree(path)
    return removed


@torch.no_grad()
def restore_adapter_values(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, adapter_name: str) -> int:
    """Copy ``tensors[prefix + <layer path>.<param>]`` into the adapter's parameters (all must be there)."""
    count = 0
    for path, layer in named_ortho_layers(module):
        if adapter_name not in layer.ortho_adapters:
            continue
        for pname, param in layer.ortho_adapters[adapter_name].named_parameters():
            key = f"{prefix}{path}.{pname}"
            if key not in tensors:
                raise ValueError(f"checkpoint has no tensor {key!r}: it was written with another adapter config")
            value = tensors[key]
            if value.shape != param.shape:
                raise ValueError(
                    f"checkpoint tensor {key!r} has shape {list(value.shape)}, expected {list(param.shape)}"
                )
            param.copy_(value.to(param.dtype))
            count += 1
    return count
