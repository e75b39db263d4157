"""Checkpoints: ``<output_dir>/checkpoint-<step>`` folders with the adapter file(s) (not full model
weights) and the loop state as safetensors + JSON (never pickles); pruning; ``latest``."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..files import one_line
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


# A checkpoint folder: our adapter file (+ the task's extra files), the optimizer's tensors, and the rest of
# the loop state (optimizer hyper-parameters, lr scheduler, fp16 grad scaler) as JSON.  Nothing is pickled,
# so resuming from a folder made elsewhere never runs code.  (The loop re-seeds every micro-batch from the
# seed and the step, so no RNG state is needed for a bit-exact resume.)
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"
STATE_FORMAT = "diffusion-oft-training-state"
STATE_VERSION = 1
REQUIRED_FILES = ("adapter.safetensors", OPTIMIZER_FILE, STATE_FILE)
# Written by diffusion-oft <= 0.1 through accelerate's save_state (pickles): read with torch's
# weights_only loader (tensors and plain containers only), the RNG pickles never.
LEGACY_REQUIRED_FILES = ("adapter.safetensors", "optimizer.bin")
LEGACY_SCHEDULER_FILE = "custom_checkpoint_0.pkl"
LEGACY_SCALER_FILE = "scaler.pt"


def checkpoint_problem(path: str | Path) -> str | None:
    """None for a complete checkpoint folder, else what is wrong with it (torn or incomplete write:
    older versions wrote in place; a copy may have been cut short)."""
    from safetensors import safe_open

    path = Path(path)
    legacy = not (path / STATE_FILE).exists() and (path / "optimizer.bin").is_file()
    for name in LEGACY_REQUIRED_FILES if legacy else REQUIRED_FILES:
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
        return f"adapter.safetensors is unreadable ({one_line(err, first=True)})"
    return None


# ---- the loop state without pickles -----------------------------------------------------------------
def _encode(value, key: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able copy of ``value`` with its tensors moved to ``tensors`` (dicts and tuples tagged, so
    int keys and tuples come back as they were)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {key!r} in a checkpoint (tensors and plain values only)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"]}
        raise ValueError(f"unknown entry {sorted(value)} in the training state")
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def save_training_state(directory: str | Path, optimizer, lr_scheduler, scaler=None, extra: dict | None = None) -> None:
    """``optimizer.safetensors`` (the optimizer's tensors) and ``training_state.json`` (everything else)."""
    import json

    from ..files import atomic_save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
        "lr_scheduler": _encode(lr_scheduler.state_dict(), "lr_scheduler", tensors),
        "grad_scaler": None if scaler is None else _encode(scaler.state_dict(), "grad_scaler", tensors),
        **(extra or {}),
    }
    atomic_save_file(tensors, directory / OPTIMIZER_FILE, {"format": STATE_FORMAT})
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")


def load_training_state(directory: str | Path, optimizer, lr_scheduler, scaler=None) -> None:
    """Restore what ``save_training_state`` wrote (or a legacy folder's optimizer / scheduler / scaler,
    read with ``torch.load(weights_only=True)``: no code runs; its RNG pickles are never opened)."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE_FILE).is_file() and (directory / "optimizer.bin").is_file():
        _load_legacy_state(directory, optimizer, lr_scheduler, scaler)
        return
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} file")
        if int(state.get("format_version", 0)) > STATE_VERSION:
            raise ValueError("written by a newer diffusion-oft; upgrade it")
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        optimizer.load_state_dict(_decode(state["optimizer"], tensors))
        lr_scheduler.load_state_dict(_decode(state["lr_scheduler"], tensors))
        if scaler is not None and state.get("grad_scaler") is not None:
            scaler.load_state_dict(_decode(state["grad_scaler"], tensors))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{directory}: cannot restore the training state ({' '.join(str(err).split())})") from None


def _load_legacy_state(directory: Path, optimizer, lr_scheduler, scaler) -> None:
    import pickle

    def load(name: str):
        try:
            return torch.load(directory / name, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            reason = one_line(err, 200)
            raise ValueError(
                f"{directory / name}: refused (only plain tensors and containers are read from old checkpoints, "
                f"never code: {reason}); resume from a checkpoint written by this version or start afresh"
            ) from None

    logger.warning(
        "%s: a checkpoint of diffusion-oft <= 0.1 (accelerate's files); its RNG files are not read", directory
    )
    optimizer.load_state_dict(load("optimizer.bin"))
    if (directory / LEGACY_SCHEDULER_FILE).is_file():
        lr_scheduler.load_state_dict(load(LEGACY_SCHEDULER_FILE))
    if scaler is not None and (directory / LEGACY_SCALER_FILE).is_file():
        scaler.load_state_dict(load(LEGACY_SCALER_FILE))


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
