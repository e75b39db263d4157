"""Tiny Stable Diffusion components built from configs (random weights, no hub, CPU-fast).

Used by the tests, the demo and the benchmarks' smoke runs.  The tokenizer is a character-level
CLIP tokenizer whose vocab files this module writes itself (byte symbols, no merges).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the bytes 0..255 (in byte order):
    printable Latin-1 bytes stand for themselves, the rest are shifted to code points 256 and up."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def write_char_tokenizer_files(directory: str | os.PathLike) -> Path:
    """vocab.json (the 256 byte symbols, the same with '</w>', two specials) + an empty merges.txt."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return directory


def tiny_tokenizer(max_length: int = 64):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_char_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=514,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection_dim or hidden_size,
    )
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(config).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
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
    )
    if sdxl:
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + cross_attention_dim // 2,
            transformer_layers_per_block=1,
        )
    return UNet2DConditionModel(**kwargs)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_sd_components(seed: int = 0) -> dict:
    from diffusers import DDPMScheduler

    return {
        "unet": tiny_unet(seed),
        "vae": tiny_vae(seed),
        "text_encoder": tiny_text_encoder(seed),
        "tokenizer": tiny_tokenizer(),
        "scheduler": DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            steps_offset=1,
        ),
        "safety_checker": None,
        "feature_extractor": None,
    }


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of tiny random components (latent 4 channels, VAE factor 2)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd_components(seed), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline with two tiny text encoders (16 + 16 = 32 cross-attention dims)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        unet=tiny_unet(seed, cross_attention_dim=32, sdxl=True),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed, hidden_size=16),
        text_encoder_2=tiny_text_encoder(seed + 1, hidden_size=16, projection_dim=16),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd(directory: str | os.PathLike, seed: int = 0, sdxl: bool = False) -> Path:
    """save_pretrained a tiny SD (or SDXL) pipeline to ``directory`` (a local model folder)."""
    pipe = tiny_sdxl_pipeline(seed) if sdxl else tiny_sd_pipeline(seed)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)
