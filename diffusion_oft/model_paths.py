"""Base-model names: hub ids, local folders and the built-in tiny models (``builtin:tiny-sd``)."""

from __future__ import annotations

# The built-in tiny models (diffusion_oft.tiny.TINY_PIPELINES): name -> what it is.
BUILTIN_MODELS = {
    "builtin:tiny-sd": "Stable Diffusion 1.x layout (UNet, one CLIP)",
    "builtin:tiny-sdxl": "SDXL layout (UNet, two CLIPs)",
    "builtin:tiny-sd3": "SD3 layout (MMDiT transformer, two CLIPs + T5)",
    "builtin:tiny-flux": "FLUX.1-dev layout (guidance embedding, CLIP + T5)",
    "builtin:tiny-flux-schnell": "FLUX.1-schnell layout (no guidance embedding)",
}


def looks_like_a_path(name_or_path: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id ("org/name"): it starts with
    ``.``, ``/`` or ``~``, has a backslash, more than one slash or a trailing one, or its first component
    is a folder that exists here (``assets/toy_sd``: ``assets/`` is local, so it is no hub id)."""
    from pathlib import Path

    value = name_or_path.strip()
    if value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1 or value.endswith("/"):
        return True
    head = value.split("/", 1)[0]
    return "/" in value and Path(head).is_dir()


def resolve_model_path(name_or_path: str, flag: str = "--pretrained_model_name_or_path") -> str:
    """The folder or hub id to load a base model from.

    ``builtin:tiny-sd`` / ``-sdxl`` / ``-sd3`` / ``-flux`` / ``-flux-schnell`` (BUILTIN_MODELS): the tiny
    models of diffusion_oft.tiny (random weights, built from configs, no download), written once to
    ~/.cache/diffusion-oft/ ($DIFFUSION_OFT_CACHE); an unknown ``builtin:`` name is an error.  A value that
    looks like a local path (``looks_like_a_path``) and does not exist fails at once (``ValueError``, one
    line) instead of spending the hub's retries on it; a hub id stays a hub id."""
    from pathlib import Path

    if name_or_path.startswith("builtin:") and name_or_path not in BUILTIN_MODELS:
        raise ValueError(f"{flag} {name_or_path}: unknown built-in model; built-in models: {', '.join(BUILTIN_MODELS)}")
    if name_or_path not in BUILTIN_MODELS:
        if not Path(name_or_path).expanduser().exists() and looks_like_a_path(name_or_path):
            raise ValueError(f"{flag} {name_or_path}: no such folder")
        return name_or_path
    import os
    import tempfile

    from .tiny import save_tiny

    cache = Path(os.environ.get("DIFFUSION_OFT_CACHE", Path.home() / ".cache" / "diffusion-oft"))
    folder = cache / name_or_path.split(":", 1)[1]
    if not (folder / "model_index.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
        save_tiny(name_or_path.split(":", 1)[1], tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
