"""Checkpoints: ``<output_dir>/checkpoint-<step>`` folders with accelerate's state (optimizer, lr
scheduler, RNG) and the adapter file(s) instead of full model weights; pruning; ``latest``."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..model import named_ortho_layers

logger = logging.getLogger("diffusion_oft.training")
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
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logger.warning("skipping checkpoint %s: %s", path, problem)
            print(f"skipping incomplete checkpoint {path}: {problem}", flush=True)
        return None
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
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {resume_from}: {path} is incomplete or torn ({problem})")
    return path


# What accelerate's save_state writes for us (optimizer, RNG of process 0) plus our adapter file.
REQUIRED_FILES = ("adapter.safetensors", "optimizer.bin", "random_states_0.pkl")


def checkpoint_problem(path: str | Path) -> str | None:
    """None for a complete checkpoint folder, else what is wrong with it (torn or incomplete write:
    older versions wrote in place; a copy may have been cut short)."""
    from safetensors import safe_open

    path = Path(path)
    for name in REQUIRED_FILES:
        file = path / name
        if not file.is_file() or file.stat().st_size == 0:
            return f"{name} is missing or empty"
    try:
        with safe_open(str(path / "adapter.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
        size = (path / "adapter.safetensors").stat().st_size
        header = int.from_bytes((path / "adapter.safetensors").read_bytes()[:8], "little")
        if size < 8 + header:
            return "adapter.safetensors is truncated"
    except Exception as err:  # safetensors raises several error types for broken files
        return f"adapter.safetensors is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def prune_checkpoints(output_dir: str | Path, total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Remove the oldest checkpoints so that at most ``total_limit`` remain: before saving a new one
    (``keep`` None: room is left for it) or after it was saved (``keep``: the new one, counted)."""
    if not total_limit:
        return []
    found = list_checkpoints(output_dir)
    excess = len(found) - total_limit + (0 if keep is not None else 1)
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


MIN_FREE_BYTES = 256 * 2**20  # checkpoints hold the adapter + optimizer state: small, but not nothing


def check_output_dir(output_dir: str | Path, min_free_bytes: int = MIN_FREE_BYTES) -> bool:
    """Fail before any model loads when ``output_dir`` cannot be created or written, or its disk is
    (nearly) full; a probe file is written and removed.  Returns whether the folder was created here
    (so a run that fails before writing anything can remove it again: ``remove_if_empty``)."""
    import os
    import tempfile

    folder = Path(output_dir)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"--output_dir {folder}: cannot write there ({reason}); choose a writable folder") from None
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise ValueError(
            f"--output_dir {folder}: only {free / 2**20:.0f} MiB free on its disk; training needs at least "
            f"{min_free_bytes / 2**20:.0f} MiB for checkpoints and the adapter"
        )
    return created


def remove_if_empty(folder: str | Path) -> None:
    """Remove ``folder`` (and empty folders in it) when nothing was written there."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()
