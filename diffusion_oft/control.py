"""Controllable generation with orthogonal adapters: the condition encoder and the ``conv_in`` hook.

The OFT/BOFT control setup: a small trainable condition encoder (ControlNet's hint encoder: convs
3→16→16→32→32→96→96→256 with SiLU) turns the condition image into features at the latent resolution,
added to the output of the UNet's ``conv_in``; format 2 adds, T2I-Adapter-like, one more feature map
after each of the UNet's downsamplers (a stride-2 conv of the encoder per resolution), so the coarse
layers that decide the layout see the condition directly.  Every output conv is zero-initialised, so
the model starts exactly as the base model; orthogonal adapters on the UNet's attention learn to use
the features.  (Measured on the toy world: added at ``conv_in`` only, 600 steps gave no following at
all — 2/12 held-out outlines followed, as the base model; at every resolution 9/12.)  A ``slim``
design (narrow widths, depthwise-separable downsamplers, 1×1 heads; :func:`encoder_design_kwargs`)
has ~1/20 of the hint encoder's parameters; its shape lives in the config, not in the format version.

Files: the adapter is a normal diffusion-oft adapter file (``adapter.safetensors``); the encoder goes
next to it in ``condition_encoder.safetensors`` (tensors + its config in the metadata, and the
SHA-256 of the adapter file it was trained with).  The adapter file's metadata names the encoder
file.  ``save_control`` / ``load_control`` write and read the pair and check that they belong together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

ENCODER_FILE = "condition_encoder.safetensors"
ENCODER_FORMAT = "diffusion-oft-condition-encoder"
ENCODER_FORMAT_VERSION = "2"  # 1: conv_in only (no downs/heads, forward returned one tensor)
HINT_CHANNELS = (16, 32, 96, 256)  # ControlNet's conditioning_embedding_out_channels


def default_channels(downscale_factor: int) -> tuple[int, ...]:
    """ControlNet's widths, one fewer stage per missing factor of 2 (factor 8: 16, 32, 96, 256)."""
    stages = int(round(math.log2(downscale_factor)))
    if 2**stages != downscale_factor:
        raise ValueError(f"downscale_factor must be a power of 2, got {downscale_factor}")
    if stages < len(HINT_CHANNELS):
        return HINT_CHANNELS[: stages + 1]
    return HINT_CHANNELS + (HINT_CHANNELS[-1],) * (stages + 1 - len(HINT_CHANNELS))


SLIM_CHANNELS = (8, 16, 32, 64)  # the slim encoder's trunk widths


def slim_channels(downscale_factor: int) -> tuple[int, ...]:
    """The slim encoder's widths for ``downscale_factor`` (factor 4: 8, 16, 32; factor 8: 8, 16, 32, 64)."""
    n = len(default_channels(downscale_factor))
    return SLIM_CHANNELS[:n] if n <= len(SLIM_CHANNELS) else SLIM_CHANNELS + (SLIM_CHANNELS[-1],) * (n - 4)


ENCODER_DESIGNS = ("hint", "slim")


def encoder_design_kwargs(design: str, downscale_factor: int) -> dict[str, Any]:
    """ConditionEncoder config for a named design: ``hint`` (ControlNet's hint encoder widths, 3×3 heads)
    or ``slim`` (widths 8/16/32(/64), depthwise-separable downsamplers, 1×1 heads; ~5 % of hint's
    parameters on the toy model)."""
    if design == "hint":
        return {}
    if design == "slim":
        return {"block_out_channels": slim_channels(downscale_factor), "head_kernel_size": 1, "separable_downs": True}
    raise ValueError(f"unknown control encoder {design!r}; choose one of {', '.join(ENCODER_DESIGNS)}")


class ConditionEncoder(ModelMixin, ConfigMixin):
    """Condition image (B, C, H, W) in [0, 1] -> a list of features: (B, out_channels, H/f, W/f) for
    ``conv_in`` (f = downscale_factor), then (B, down_channels[i], H/(f 2^(i+1)), ...) per downsampler.

    Layout (f = 8, SD): conv 3→16, then per stage a conv c→c and a stride-2 conv c→c', all 3×3 with
    SiLU (16→16→32→32→96→96→256), then a zero-initialised conv to ``out_channels``; per entry of
    ``down_channels`` a stride-2 conv c→c with SiLU (``downs``) and a zero-initialised conv to that
    width (``heads``).  ``head_kernel_size`` (3 or 1) is the kernel of the zero-initialised output
    convs; ``separable_downs`` makes each ``downs`` conv depthwise 3×3 + pointwise 1×1 (9c + c² weights
    instead of 9c²).  Narrow ``block_out_channels`` with both give a slim encoder (``SLIM_ENCODER``).
    """

    @register_to_config
    def __init__(
        self,
        out_channels: int = 320,
        conditioning_channels: int = 3,
        downscale_factor: int = 8,
        block_out_channels: tuple[int, ...] | None = None,
        down_channels: tuple[int, ...] = (),
        head_kernel_size: int = 3,
        separable_downs: bool = False,
    ):
        super().__init__()
        channels = tuple(block_out_channels or default_channels(downscale_factor))
        if len(channels) - 1 != int(round(math.log2(downscale_factor))):
            raise ValueError(
                f"block_out_channels {channels} gives {len(channels) - 1} downsamplings, "
                f"but downscale_factor {downscale_factor} needs {int(round(math.log2(downscale_factor)))}"
            )
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        if head_kernel_size not in (1, 3):
            raise ValueError(f"head_kernel_size must be 1 or 3, got {head_kernel_size}")
        c = channels[-1]
        self.conv_out = _zero_conv(c, out_channels, head_kernel_size)
        self.downs = nn.ModuleList(_down_conv(c, separable_downs) for _ in down_channels)
        self.heads = nn.ModuleList(_zero_conv(c, d, head_kernel_size) for d in down_channels)

    def forward(self, condition: torch.Tensor) -> list[torch.Tensor]:
        x = nn.functional.silu(self.conv_in(condition.to(self.conv_in.weight.dtype)))
        for conv in self.blocks:
            x = nn.functional.silu(conv(x))
        features = [self.conv_out(x)]
        for down, head in zip(self.downs, self.heads, strict=True):
            x = nn.functional.silu(down(x))
            features.append(head(x))
        return features


def _down_conv(c: int, separable: bool) -> nn.Module:
    """Stride-2 3×3 conv c→c, or its depthwise-separable form (depthwise 3×3 stride 2, then 1×1)."""
    if not separable:
        return nn.Conv2d(c, c, 3, padding=1, stride=2)
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, stride=2, groups=c), nn.Conv2d(c, c, 1))


def _zero_conv(c_in: int, c_out: int, kernel_size: int = 3) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def injection_points(unet: nn.Module) -> list[nn.Module]:
    """Where the features are added: ``conv_in``, then each down block's downsampler (fine to coarse)."""
    if not hasattr(unet, "conv_in"):
        raise ValueError(f"{type(unet).__name__} has no conv_in; expected a UNet2DConditionModel")
    return [unet.conv_in] + [b.downsamplers[0] for b in unet.down_blocks if getattr(b, "downsamplers", None)]


def downsampler_channels(unet: nn.Module) -> tuple[int, ...]:
    """Output width of each down block's downsampler (SD 1.5: 320, 640, 1280; the toy model: 32, 64)."""
    return tuple(
        int(c)
        for b, c in zip(unet.down_blocks, unet.config.block_out_channels, strict=True)
        if getattr(b, "downsamplers", None)
    )


def condition_encoder_for(
    unet: nn.Module, vae_scale_factor: int, injection: str = "multiscale", design: str = "hint", **kwargs
) -> ConditionEncoder:
    """An encoder that fits ``unet``: features for conv_in (first block width) at the latent resolution
    and, with ``injection="multiscale"`` (default), for each downsampler; ``"conv_in"``: conv_in only.
    ``design``: ``"hint"`` or ``"slim"`` (see :func:`encoder_design_kwargs`); ``kwargs`` override it."""
    if injection not in INJECTIONS:
        raise ValueError(f"unknown control injection {injection!r}; choose one of {', '.join(INJECTIONS)}")
    down = downsampler_channels(unet) if injection == "multiscale" else ()
    config = {**encoder_design_kwargs(design, vae_scale_factor), **kwargs}
    return ConditionEncoder(
        out_channels=unet.config.block_out_channels[0], downscale_factor=vae_scale_factor, down_channels=down, **config
    )


INJECTIONS = ("multiscale", "conv_in")


# ---- the conv_in hook -------------------------------------------------------------------------------
class ControlState:
    """What the hooks add: ``features`` (the encoder's list: conv_in's (B, C, h, w), then one per
    downsampler; a single tensor counts as conv_in's) times ``scale``; nothing while features is None."""

    def __init__(self):
        self.features: list[torch.Tensor] | torch.Tensor | None = None
        self.scale: float = 1.0
        self.handles: list = []


def attach_control(unet: nn.Module) -> ControlState:
    """Install (once) the forward hooks on ``unet.conv_in`` and the downsamplers that add the features."""
    state = getattr(unet, "_ortho_control", None)
    if state is not None:
        return state
    points = injection_points(unet)
    state = ControlState()

    def make_hook(index: int, name: str):
        def hook(module, inputs, output):
            feats = state.features
            if feats is None or state.scale == 0:
                return output
            feats = [feats] if isinstance(feats, torch.Tensor) else feats
            if index >= len(feats):
                return output
            return output + state.scale * _fit(feats[index], output, name)

        return hook

    names = ["conv_in"] + [f"downsampler {i}" for i in range(1, len(points))]
    state.handles = [
        m.register_forward_hook(make_hook(i, n)) for i, (m, n) in enumerate(zip(points, names, strict=True))
    ]
    object.__setattr__(unet, "_ortho_control", state)
    return state


def _fit(feats: torch.Tensor, output: torch.Tensor, name: str) -> torch.Tensor:
    """``feats`` checked against a hooked module's output, repeated over classifier-free guidance's batch."""
    if feats.shape[-2:] != output.shape[-2:] or feats.shape[1] != output.shape[1]:
        raise ValueError(
            f"control features {tuple(feats.shape[1:])} do not fit {name}'s output {tuple(output.shape[1:])}: "
            "the condition image must have the size of the generated image"
        )
    if feats.shape[0] != output.shape[0]:
        if output.shape[0] % feats.shape[0]:
            raise ValueError(f"control batch {feats.shape[0]} does not divide the UNet batch {output.shape[0]}")
        # classifier-free guidance: the same condition for both branches
        feats = feats.repeat(output.shape[0] // feats.shape[0], 1, 1, 1)
    return feats.to(output.dtype)


def detach_control(unet: nn.Module) -> None:
    state = getattr(unet, "_ortho_control", None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        object.__delattr__(unet, "_ortho_control")


class ControlledUNet(nn.Module):
    """UNet + condition encoder as one module (one DDP wrapper in training)."""

    def __init__(self, unet: nn.Module, encoder: ConditionEncoder):
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.state = attach_control(unet)

    def forward(self, sample, timestep, encoder_hidden_states, condition, control_scale: float = 1.0, **kwargs):
        self.state.features = self.encoder(condition)
        self.state.scale = control_scale
        try:
            return self.unet(sample, timestep, encoder_hidden_states, **kwargs)
        finally:
            self.state.features = None
            self.state.scale = 1.0


# ---- files -----------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_condition_encoder(
    encoder: ConditionEncoder,
    path: str | os.PathLike,
    paired_adapter: str | os.PathLike | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the encoder (float32 tensors, config in the metadata, the paired adapter's SHA-256)."""
    from .files import atomic_save_file

    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder.state_dict().items()}
    metadata = {
        "format": ENCODER_FORMAT,
        "format_version": ENCODER_FORMAT_VERSION,
        "config": json.dumps({k: v for k, v in encoder.config.items() if not k.startswith("_")}, default=list),
        **(extra_metadata or {}),
    }
    if paired_adapter is not None:
        metadata["paired_adapter"] = Path(paired_adapter).name
        metadata["paired_adapter_sha256"] = file_sha256(paired_adapter)
    atomic_save_file(tensors, path, metadata)
    return path


def load_condition_encoder(path: str | os.PathLike) -> tuple[ConditionEncoder, dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such condition encoder file")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") != ENCODER_FORMAT:
        raise ValueError(f"{path.name}: not a diffusion-oft condition encoder (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != ENCODER_FORMAT_VERSION:
        raise ValueError(
            f"{path.name}: condition encoder format {version}, this diffusion-oft reads format "
            f"{ENCODER_FORMAT_VERSION} (features at every UNet resolution); retrain with `diffusion-oft train control`"
        )
    config = json.loads(metadata["config"])
    for key in ("block_out_channels", "down_channels"):
        if config.get(key) is not None:
            config[key] = tuple(config[key])
    encoder = ConditionEncoder(**config)
    missing, unexpected = encoder.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path.name}: tensors do not match the encoder config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return encoder.eval(), metadata


def save_control(
    components: Any,
    encoder: ConditionEncoder,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    extra_metadata: dict[str, str] | None = None,
) -> tuple[Path, Path]:
    """adapter.safetensors + condition_encoder.safetensors in ``directory`` (a model or pipeline-like object)."""
    from .files import save_adapter

    directory = Path(directory)
    meta = {"condition_encoder": ENCODER_FILE, **(extra_metadata or {})}
    adapter = save_adapter(
        components, directory / "adapter.safetensors", adapter_name=adapter_name, extra_metadata=meta
    )
    enc = save_condition_encoder(
        encoder, directory / ENCODER_FILE, paired_adapter=adapter, extra_metadata=extra_metadata
    )
    return adapter, enc


def control_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(adapter file, encoder file) from a folder or from the adapter file (which names its encoder)."""
    from .files import read_adapter_file

    path = Path(path)
    adapter = path / "adapter.safetensors" if path.is_dir() else path
    if not adapter.is_file():
        raise FileNotFoundError(f"{adapter}: no such adapter file")
    _, metadata = read_adapter_file(adapter)
    name = metadata.get("condition_encoder")
    if not name:
        raise ValueError(f"{adapter.name}: this adapter was not trained with a condition encoder (no pairing)")
    return adapter, adapter.parent / name


def is_control_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adapter file whose metadata names a condition encoder (a control training's)."""
    from .files import read_adapter_file

    path = Path(path)
    return path.is_file() and bool(read_adapter_file(path)[1].get("condition_encoder"))


def load_paired_encoder(
    path: str | os.PathLike, unet: nn.Module | None = None, check_pairing: bool = True
) -> ConditionEncoder:
    """The condition encoder paired with a control adapter (a folder or the adapter file), without
    loading the adapter.  Refuses an encoder trained with another adapter file and, given ``unet``,
    one whose width does not fit its conv_in."""
    adapter, enc_path = control_files(path)
    encoder, metadata = load_condition_encoder(enc_path)
    if check_pairing and metadata.get("paired_adapter_sha256") not in (None, file_sha256(adapter)):
        raise ValueError(
            f"{enc_path.name} was trained with another {metadata.get('paired_adapter', 'adapter')} "
            "(SHA-256 differs); keep the files of one training run together, or pass check_pairing=False"
        )
    if unet is not None:
        if unet.config.block_out_channels[0] != encoder.config.out_channels:
            raise ValueError(
                f"{enc_path.name}: encoder width {encoder.config.out_channels} does not fit this UNet's conv_in "
                f"({unet.config.block_out_channels[0]})"
            )
        down, fits = tuple(encoder.config.down_channels), downsampler_channels(unet)
        if down and down != fits[: len(down)]:
            raise ValueError(f"{enc_path.name}: encoder widths {down} do not fit this UNet's downsamplers {fits}")
        encoder = encoder.to(unet.device)
    return encoder


def load_condition_image(path: str | os.PathLike, height: int, width: int):
    """A condition image file as an RGB PIL image of ``width`` x ``height`` (bilinear resize)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB").resize((width, height), Image.BILINEAR)


def load_control(
    pipe_or_unet: Any, path: str | os.PathLike, adapter_name: str = "default", check_pairing: bool = True
) -> ConditionEncoder:
    """Load the adapter into the pipeline (or UNet) and return the paired condition encoder, with the
    conv_in hook installed on the UNet.  Refuses an encoder trained with another adapter file."""
    from .files import load_adapter

    adapter, _ = control_files(path)
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    encoder = load_paired_encoder(adapter, unet=unet, check_pairing=check_pairing)
    load_adapter(
        pipe_or_unet if hasattr(pipe_or_unet, "unet") else unet,
        adapter,
        adapter_name=adapter_name,
        **({} if hasattr(pipe_or_unet, "unet") else {"component": "unet"}),
    )
    attach_control(unet)
    return encoder.to(unet.device)  # float32: a few MB; the pipeline casts its output
