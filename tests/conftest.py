"""Shared fixtures: tiny diffusers models built from configs (no hub, CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

import diffusion_oft as do
from diffusion_oft import tiny

torch.set_num_threads(1)  # tiny models: one thread is fastest and behaves on a shared machine

REPO = Path(__file__).resolve().parents[1]
# Made by tools, not by the tests' own writes.
_TOOL_ENTRIES = {".pytest_cache", ".ruff_cache", "__pycache__", ".hypothesis"}


@pytest.fixture(autouse=True)
def _writes_only_to_temporary_folders():
    """Tests write only to temporary folders: a test that leaves a new file or folder in the checkout
    (e.g. a default --output_dir) fails here."""
    before = {p.name for p in REPO.iterdir()}
    yield
    new = sorted({p.name for p in REPO.iterdir()} - before - _TOOL_ENTRIES)
    assert not new, f"the test left {new} in the checkout {REPO}; tests must write to tmp_path"


def make_tiny_unet(seed: int = 0, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    return tiny.tiny_unet(seed, cross_attention_dim=cross_attention_dim).eval()


def random_adapter(config: dict, seed: int = 3, std: float = 0.1) -> UNet2DConditionModel:
    """A tiny UNet with an adapter at random parameters (magnitudes around 1)."""
    unet = make_tiny_unet()
    do.add_adapter(unet, do.AdapterConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("magnitude"):
                p.copy_(1 + torch.randn_like(p) * std)
            elif p.requires_grad:
                p.copy_(torch.randn_like(p) * std)
    return unet


@pytest.fixture
def tiny_unet() -> UNet2DConditionModel:
    return make_tiny_unet()


@pytest.fixture
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500])
    text = torch.randn(2, 7, 32, generator=g)
    return sample, timesteps, text


def run_unet(unet, inputs, grad: bool = False, **kwargs) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return unet(*inputs, **kwargs).sample


# One small config per method that fits every projection of the tiny UNet (dims 32, 64).
METHOD_CONFIGS = {
    "oft": dict(method="oft", block_size=8),
    "boft": dict(method="boft", block_size=4, n_butterfly_factors=2),
    "ether": dict(method="ether", num_blocks=2),
    "ether_plus": dict(method="ether_plus", num_blocks=2),
    "hra": dict(method="hra", n_reflections=4),
}
