"""Shared fixtures: tiny diffusers models built from configs (no hub, CPU, fast)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

torch.set_num_threads(1)  # tiny models: one thread is fastest and behaves on a shared machine


def make_tiny_unet(seed: int = 0, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


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
}
