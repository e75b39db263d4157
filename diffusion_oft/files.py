"""Adapter files: one .safetensors with only the adapter tensors and the config in its metadata.

Keys:      ``<component>.<module path of the adapted projection>.<parameter>``, e.g.
           ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.skew``.
Metadata:  format = "diffusion-oft", format_version, adapter_config (JSON: {component: config}),
           base_model (JSON: {component: {"class", "name_or_path", "num_layers"}}).
Loading validates every key, shape and value against the target before changing anything.
Pickle-based files are never opened.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .config import AdapterConfig
from .methods import get_method_class
from .model import adapter_configs, add_adapter, find_targets, named_ortho_layers, validate_targets

FORMAT_NAME = "diffusion-oft"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Pipeline attributes that may carry adapters, in the order they are searched.
COMPONENT_NAMES = ("unet", "transformer", "controlnet", "text_encoder", "text_encoder_2", "text_encoder_3")


class AdapterFileError(ValueError):
    """An adapter file that cannot be used (with a one-line reason)."""


def is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and not isinstance(obj, nn.Module)


def default_component_name(model: nn.Module) -> str:
    cls = type(model).__name__
    if cls.startswith("UNet"):
        return "unet"
    if "ControlNet" in cls:
        return "controlnet"
    if "Transformer" in cls and "CLIP" not in cls and "T5" not in cls:
        return "transformer"
    if "TextModel" in cls or "Encoder" in cls:
        return "text_encoder"
    return cls.lower()


def unwrap_compiled(module: Any) -> Any:
    """The model inside a ``torch.compile`` wrapper (module paths and adapters live there)."""
    return getattr(module, "_orig_mod", module) if isinstance(module, nn.Module) else module


def pipeline_components(target: Any, component: str | None = None, adapted: bool = True) -> dict[str, nn.Module]:
    """The one way to find a pipeline's models: {component name: model}, compiled wrappers unwrapped, a
    MultiControlNetModel's nets as ``<name>.nets.<i>`` (when the wrapper itself carries no adapter).  For a
    single model: {``component`` or its default name: model}.  ``adapted``: only the models with adapters."""
    found: dict[str, nn.Module] = {}
    if is_pipeline(target):
        for name, module in target.components.items():
            module = unwrap_compiled(module)
            nets = getattr(module, "nets", None)
            if isinstance(nets, nn.ModuleList) and not adapter_configs(module):
                found.update({f"{name}.nets.{i}": unwrap_compiled(net) for i, net in enumerate(nets)})
            elif isinstance(module, nn.Module):
                found[name] = module
    else:
        model = unwrap_compiled(target)
        if isinstance(model, nn.Module):
            found[component or default_component_name(model)] = model
    return {n: m for n, m in found.items() if adapter_configs(m)} if adapted else found


def plain_write_mode(path: str | os.PathLike) -> int:
    """The permission bits a plain ``open(path, "w")`` would leave: an existing file's, else 0666 less
    the umask (read from /proc where it can be, since ``os.umask`` can only be read by setting it)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors save via a temporary file + rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, plain_write_mode(path))  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", prefix: str = "") -> dict[str, torch.Tensor]:
    """{``prefix<layer path>.<param>``: float32 tensor} for one adapter of one model."""
    state = {}
    for path, layer in named_ortho_layers(model):
        if adapter_name not in layer.ortho_adapters:
            continue
        for pname, param in layer.ortho_adapters[adapter_name].named_parameters():
            state[f"{prefix}{path}.{pname}"] = param.detach().float().cpu().contiguous()
    return state


def save_adapter(
    model_or_pipeline: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    component: str | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the adapter ``adapter_name`` of a model or of every adapted pipeline component."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files are .safetensors; got {path.name!r}")
    components = pipeline_components(model_or_pipeline, component)
    tensors: dict[str, torch.Tensor] = {}
    configs, base = {}, {}
    for comp, module in components.items():
        if adapter_name not in adapter_configs(module):
            continue
        config = adapter_configs(module)[adapter_name]
        state = adapter_state_dict(module, adapter_name, prefix=f"{comp}.")
        tensors.update(state)
        configs[comp] = config.to_dict()
        base[comp] = {
            "class": type(module).__name__,
            "name_or_path": str(getattr(getattr(module, "config", None), "_name_or_path", "") or ""),
            "num_layers": len({k.rsplit(".", 1)[0] for k in state}),
        }
    if not tensors:
        raise ValueError(f"nothing to save: no adapter named {adapter_name!r} in {type(model_or_pipeline).__name__}")
    return write_adapter_file(tensors, configs, base, path, extra_metadata)


def write_adapter_file(
    tensors: dict[str, torch.Tensor],
    configs: dict[str, dict[str, Any]] | dict[str, AdapterConfig],
    base_model: dict[str, dict],
    path: str | os.PathLike,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """The one writer of the adapter format: float32 tensors keyed ``<component>.<path>.<param>``,
    {component: config} and {component: base-model hints} in the metadata (atomically)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files are .safetensors; got {path.name!r}")
    as_dicts = {c: cfg.to_dict() if isinstance(cfg, AdapterConfig) else cfg for c, cfg in configs.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "library_version": __version__,
        "adapter_config": json.dumps(as_dicts, sort_keys=True),
        "base_model": json.dumps(base_model, sort_keys=True),
        **(extra_metadata or {}),
    }
    atomic_save_file({k: v.float().contiguous() for k, v in tensors.items()}, path, metadata)
    return path


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with one-line errors for unusable files."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path.name}: pickle-based files ({path.suffix}) are never loaded, since they can run code; "
            "convert it to .safetensors with the tool that made it"
        )
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several error types for broken files
        raise AdapterFileError(f"{path.name}: not a readable safetensors file ({one_line(err, first=True)})") from None
    return tensors, metadata


def parse_metadata(metadata: dict[str, str], name: str) -> dict[str, AdapterConfig]:
    if metadata.get("format") != FORMAT_NAME:
        raise AdapterFileError(
            f"{name}: not a diffusion-oft adapter (metadata format={metadata.get('format')!r}); "
            "PEFT and kohya files are read by diffusion_oft.convert"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise AdapterFileError(f"{name}: bad format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{name}: format version {version} is newer than this diffusion-oft understands "
            f"({FORMAT_VERSION}); upgrade diffusion-oft"
        )
    if "adapter_config" not in metadata:
        raise AdapterFileError(f"{name}: metadata has no adapter_config")
    try:
        raw = json.loads(metadata["adapter_config"])
        if not isinstance(raw, dict) or not all(isinstance(c, str) and isinstance(v, dict) for c, v in raw.items()):
            raise TypeError("expected a JSON object {component: {field: value}}")
        return {comp: AdapterConfig.from_dict(cfg) for comp, cfg in raw.items()}
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as err:
        raise AdapterFileError(f"{name}: bad adapter_config in metadata ({one_line(err)})") from None


def one_line(err: BaseException | str, limit: int = 300, first: bool = False) -> str:
    """An exception's message on one line, shortened (the one trim of error messages for users);
    ``first``: only its first non-empty line (tracebacks, library messages with a long tail)."""
    text = str(err)
    if first:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_component(
    target: Any, comp: str, n_components: int, component: str | None, name: str, first_key: str | None = None
) -> nn.Module:
    if is_pipeline(target):
        module = pipeline_components(target, adapted=False).get(comp)
        if not isinstance(module, nn.Module):
            has = [c for c in COMPONENT_NAMES if isinstance(getattr(target, c, None), nn.Module)]
            tensor = f"tensor {first_key!r} is" if first_key else "adapter is"
            raise AdapterFileError(
                f"{name}: {tensor} for component {comp!r}, which this {type(target).__name__} does not have "
                f"(it has {', '.join(has) or 'none of ' + ', '.join(COMPONENT_NAMES)}); "
                "the file was made for another base model"
            )
        return module
    if n_components > 1 and component != comp:
        raise AdapterFileError(
            f"{name}: the file holds several components; pass component=... or load it into the pipeline"
        )
    return unwrap_compiled(target)


def load_adapter(
    pipeline_or_model: Any,
    path: str | os.PathLike,
    adapter_name: str = "default",
    component: str | None = None,
) -> Any:
    """Load an adapter file into a pipeline (its unet / transformer / text encoders / controlnet)
    or a model.  Everything is validated first; on any error the target is left unchanged."""
    name = Path(path).name
    try:
        tensors, configs = _read_for_loading(pipeline_or_model, path, component)
        return load_tensors(pipeline_or_model, tensors, configs, name, adapter_name, component)
    except AdapterFileError as err:
        raise AdapterFileError(one_line(err, 500)) from None


# Readers of other formats (PEFT folders / files, kohya / LyCORIS files), asked in order by
# ``load_adapter`` for anything that is not our own file: ``reader(path, target, component)`` returns
# (tensors, configs) in our layout or raises AdapterFileError.  ``diffusion_oft.convert`` registers its
# reader when imported (the package's ``__init__`` imports it), so this floor never imports a higher one.
ForeignReader = Callable[[Path, Any, "str | None"], "tuple[dict[str, torch.Tensor], dict[str, AdapterConfig]]"]
FOREIGN_READERS: list[ForeignReader] = []


def register_reader(reader: ForeignReader) -> ForeignReader:
    """Add a reader of a foreign adapter format for ``load_adapter`` (usable as a decorator)."""
    if reader not in FOREIGN_READERS:
        FOREIGN_READERS.append(reader)
    return reader


def _read_for_loading(target: Any, path: str | os.PathLike, component: str | None):
    """(tensors, configs) of our own files; other formats go to the registered readers
    (``FOREIGN_READERS``: ``diffusion_oft.convert``), which convert against ``target``, still unchanged."""
    path = Path(path)
    metadata: dict[str, str] = {}
    if not path.is_dir():
        tensors, metadata = read_adapter_file(path)
        if metadata.get("format") == FORMAT_NAME:
            return tensors, parse_metadata(metadata, path.name)
    for reader in FOREIGN_READERS:
        return reader(path, target, component)
    parse_metadata(metadata, path.name)  # no reader registered: the plain "not a diffusion-oft adapter" error
    raise AdapterFileError(f"{path.name}: not a diffusion-oft adapter")


def load_tensors(
    pipeline_or_model: Any,
    tensors: dict[str, torch.Tensor],
    configs: dict[str, AdapterConfig],
    name: str,
    adapter_name: str = "default",
    component: str | None = None,
) -> Any:
    """Validate ``tensors`` / ``configs`` against the target, then add and fill the adapter(s)."""
    if not configs:
        raise AdapterFileError(f"{name}: adapter_config lists no component")
    if component is not None and not is_pipeline(pipeline_or_model):
        if component not in configs:
            raise AdapterFileError(f"{name}: no component {component!r} in the file (it has {sorted(configs)})")
        configs = {component: configs[component]}
        tensors = {k: v for k, v in tensors.items() if k.startswith(component + ".")}  # the other parts stay out
    plan = []
    remaining = set(tensors)
    for comp, config in configs.items():
        first_key = min((k for k in tensors if k.startswith(comp + ".")), default=None)
        module = _resolve_component(pipeline_or_model, comp, len(configs), component, name, first_key)
        if adapter_name in adapter_configs(module):
            raise AdapterFileError(
                f"{name}: the {comp} already has an adapter named {adapter_name!r}; use another adapter_name"
            )
        targets = find_targets(module, config)
        try:
            validate_targets(module, config, targets)
        except ValueError as err:
            raise AdapterFileError(f"{name}: does not fit this {type(module).__name__}: {err}") from None
        method_cls = get_method_class(config.method)
        expected: dict[str, tuple[int, ...]] = {}
        for t in targets:
            for pname, shape in method_cls.parameter_shapes(t.in_features, t.out_features, config).items():
                expected[f"{comp}.{t.path}.{pname}"] = tuple(shape)
        file_keys = sorted(k for k in tensors if k.startswith(comp + "."))
        for key in file_keys:
            if key not in expected:
                module_path = key[len(comp) + 1 :].rsplit(".", 1)[0]
                raise AdapterFileError(
                    f"{name}: unexpected tensor {key!r}: module {module_path!r} is not an adapted projection "
                    f"of this {type(module).__name__} (a file for another base model?)"
                )
        for key, shape in expected.items():
            if key not in tensors:
                raise AdapterFileError(
                    f"{name}: missing tensor {key!r} (module {key.rsplit('.', 1)[0]!r} expects {config.method} "
                    f"parameters of shape {list(shape)}); the file was made for another base model or config"
                )
            tensor = tensors[key]
            if tuple(tensor.shape) != shape:
                raise AdapterFileError(
                    f"{name}: tensor {key!r} has shape {list(tensor.shape)}, but module "
                    f"{key.rsplit('.', 1)[0]!r} expects {list(shape)} (a file for another base model or config?)"
                )
            if not tensor.dtype.is_floating_point:
                raise AdapterFileError(f"{name}: tensor {key!r} has dtype {tensor.dtype}; expected a float dtype")
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterFileError(f"{name}: tensor {key!r} contains NaN or inf values")
        remaining -= set(expected)
        plan.append((comp, module, config, expected))
    if remaining:
        raise AdapterFileError(f"{name}: tensor {sorted(remaining)[0]!r} belongs to no component in the metadata")

    # Validated: now change the target(s).
    for comp, module, config, _ in plan:
        add_adapter(module, config, adapter_name)
        with torch.no_grad():
            for path, layer in named_ortho_layers(module):
                if adapter_name not in layer.ortho_adapters:
                    continue
                for pname, param in layer.ortho_adapters[adapter_name].named_parameters():
                    param.copy_(tensors[f"{comp}.{path}.{pname}"])
        module.requires_grad_(False)  # loaded for inference; call add_adapter to train a new one
    return pipeline_or_model


def adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """What an adapter file holds: configs, base model hints, parameter counts."""
    tensors, metadata = read_adapter_file(path)
    configs = parse_metadata(metadata, Path(path).name)
    try:
        base = json.loads(metadata.get("base_model", "{}") or "{}")
    except ValueError:
        base = None
    base = base if isinstance(base, dict) else {}  # only hints: a bad value is not fatal
    info = {"format_version": metadata.get("format_version"), "components": {}}
    for comp, config in configs.items():
        keys = [k for k in tensors if k.startswith(comp + ".")]
        info["components"][comp] = {
            "config": config.to_dict(),
            "num_layers": len({k.rsplit(".", 1)[0] for k in keys}),
            "num_parameters": int(sum(tensors[k].numel() for k in keys)),
            "base_model": base.get(comp, {}),
        }
    return info
