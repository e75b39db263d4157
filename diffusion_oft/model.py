"""Adding, merging, enabling and removing adapters on a diffusers (or transformers) model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import install_processors, uninstall_processors
from .batching import group_methods
from .config import AdapterConfig
from .layers import OrthoLinear
from .methods import get_method_class

CONFIGS_ATTR = "ortho_adapter_configs"  # {adapter name: AdapterConfig} kept on the adapted model


@dataclass
class Target:
    """One projection an adapter will be put on."""

    path: str  # module path in the model, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    in_features: int
    out_features: int
    attention_kind: str | None  # "self" / "cross" for attention projections, None for extra targets


def _attention_kind(owner: nn.Module) -> str:
    return "cross" if getattr(owner, "is_cross_attention", False) else "self"


def find_targets(model: nn.Module, config: AdapterConfig) -> list[Target]:
    """The projections ``config`` selects in ``model`` (suffix match on module paths)."""
    modules = dict(model.named_modules())
    targets = []
    for path, module in modules.items():
        if not isinstance(module, (nn.Linear, OrthoLinear)) or path.endswith(".base_layer"):
            continue
        for suffix in config.target_modules:
            if path == suffix or path.endswith("." + suffix):
                owner = modules.get(path[: -len(suffix)].rstrip("."), model)
                kind = _attention_kind(owner)
                if config.attention in ("all", kind):
                    targets.append(Target(path, module.in_features, module.out_features, kind))
                break
        else:
            if any(path == s or path.endswith("." + s) for s in config.extra_target_modules):
                targets.append(Target(path, module.in_features, module.out_features, None))
    return targets


def validate_targets(model: nn.Module, config: AdapterConfig, targets: list[Target]) -> None:
    """Raise (before anything is changed) if the config cannot be put on these targets."""
    if not targets:
        linear_names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={list(config.target_modules)} "
            f"with attention={config.attention!r}; linear layer names in this model: {linear_names[:20]}"
        )
    method_cls = get_method_class(config.method)
    for target in targets:
        problem = method_cls.check_dims(target.in_features, target.out_features, config)
        if problem:
            raise ValueError(
                f"cannot put {config.method} on {target.path} "
                f"(in={target.in_features}, out={target.out_features}): {problem}"
            )


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    return getattr(model, CONFIGS_ATTR, {})


def add_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Put an orthogonal adapter on ``model``'s targeted projections (in place; returns model).

    Everything already in the model is frozen; only the new adapter's parameters require grad.
    """
    if adapter_name in adapter_configs(model):
        raise ValueError(f"model already has an adapter named {adapter_name!r}; pick another adapter_name")
    if "." in adapter_name or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty name without dots, got {adapter_name!r}")
    targets = find_targets(model, config)
    validate_targets(model, config, targets)
    method_cls = get_method_class(config.method)
    model.requires_grad_(False)
    for target in targets:
        layer = model.get_submodule(target.path)
        if not isinstance(layer, OrthoLinear):
            layer = OrthoLinear(layer)
            replace_submodule(model, target.path, layer)
        method = method_cls(target.in_features, target.out_features, config)
        layer.add_adapter(adapter_name, method)
        layer.train(layer.base_layer.training)  # new modules start in train mode; follow the model (eval: cache)
    new_methods = [m.ortho_adapters[adapter_name] for m in ortho_layers(model) if adapter_name in m.ortho_adapters]
    for method in new_methods:  # only the new adapter trains; earlier ones are frozen too
        method.requires_grad_(True)
    group_methods(new_methods)  # training builds their transforms together (see diffusion_oft.batching)
    install_processors(model)
    configs = dict(adapter_configs(model))
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)
    return model


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` (a dotted module path of ``model``) and return what was there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent.get_submodule(child)
    setattr(parent, child, new)
    return old


def ortho_layers(model: nn.Module) -> list[OrthoLinear]:
    return [m for m in model.modules() if isinstance(m, OrthoLinear)]


def named_ortho_layers(model: nn.Module) -> list[tuple[str, OrthoLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OrthoLinear)]


def _require_adapters(model: nn.Module) -> list[OrthoLinear]:
    layers = ortho_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} carries no orthogonal adapter (call add_adapter or load_adapter)")
    return layers


def merge_adapter(model: nn.Module) -> None:
    """Fold the active adapters into the frozen weights: the model then runs at the base model's cost."""
    for layer in _require_adapters(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo ``merge_adapter``: the base weights come back bit for bit (``merge`` keeps a copy of each
    adapted weight while merged), whatever the adapters' parameters; no drift over any number of cycles."""
    for module in model.modules():
        if getattr(module, "fused_projections", False) and any(
            isinstance(m, OrthoLinear) and m.merged_adapters for m in module.modules()
        ):
            raise RuntimeError("the projections are fused with merged adapters; call unfuse_qkv_projections() first")
    for layer in _require_adapters(model):
        layer.unmerge()


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn the (unmerged) adapters on or off without removing them."""
    for layer in _require_adapters(model):
        if layer.merged_adapters and not enabled:
            raise RuntimeError("adapters are merged into the weights; call unmerge_adapter(model) before disabling")
        layer.adapters_enabled = enabled
        layer.clear_cache()


def adapter_weights(names: list[str], weights: list[float] | float | None) -> list[float]:
    """One scale per adapter: ``weights`` as a list, one number for all, or None for 1.0 each."""
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, (int, float)):
        return [float(weights)] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
    return weights


def set_adapters(model: nn.Module, names: list[str] | str, weights: list[float] | float | None = None) -> None:
    """Choose the active adapters (applied in the given order) and a scale for each: default 1.0 for
    every named adapter, as diffusers' ``set_adapters`` (earlier scales are not kept)."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in adapter_configs(model)]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; this model has {list(adapter_configs(model))}")
    scales = dict(zip(names, adapter_weights(names, weights), strict=True))
    for layer in _require_adapters(model):
        present = [n for n in names if n in layer.ortho_adapters]
        layer.set_active_adapters(present, {n: scales[n] for n in present})


def remove_adapter(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Remove one adapter (or all when ``adapter_name`` is None): merged adapters are unmerged, and
    with the last adapter gone the original nn.Linear layers and diffusers' processors come back."""
    names = list(adapter_configs(model)) if adapter_name is None else [adapter_name]
    if adapter_name is not None and adapter_name not in adapter_configs(model):
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(adapter_configs(model))}")
    for path, layer in named_ortho_layers(model):
        if layer.merged_adapters:
            layer.unmerge()
        for name in names:
            if name in layer.ortho_adapters:
                layer.delete_adapter(name)
        if len(layer.ortho_adapters) == 0:
            replace_submodule(model, path, layer.base_layer)
    configs = {k: v for k, v in adapter_configs(model).items() if k not in names}
    setattr(model, CONFIGS_ATTR, configs)
    uninstall_processors(model)
    return model


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The adapter parameters (of one adapter, or all), e.g. to hand to an optimizer."""
    params = []
    for layer in ortho_layers(model):
        for name, method in layer.ortho_adapters.items():
            if adapter_name is None or name == adapter_name:
                params.extend(method.parameters())
    return params


def count_adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> int:
    return sum(p.numel() for p in adapter_parameters(model, adapter_name))


@torch.no_grad()
def apply_constraints(model: nn.Module) -> None:
    """Run each adapter's projection (COFT radius); call after every optimizer step."""
    for layer in ortho_layers(model):
        for method in layer.ortho_adapters.values():
            method.constrain_()
