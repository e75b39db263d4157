"""Tiny Stable Diffusion, SD3 and Flux components built from configs (random weights, no hub, CPU-fast).

Used by the tests, the demo and the benchmarks' smoke runs.  The CLIP tokenizer is a character-level
tokenizer whose vocab files this module writes itself (byte symbols, no merges); the T5 tokenizer is a
character-level Unigram vocabulary built in code (``tiny_t5_tokenizer``).
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


def tiny_vae(seed: int = 0, latent_channels: int = 4, **latent_stats: float):
    """A 2-level AutoencoderKL (scale factor 2); ``latent_stats``: scaling_factor / shift_factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {"use_quant_conv": False, "use_post_quant_conv": False} if latent_stats else {}  # as SD3 / Flux
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        **latent_stats,
        **extra,
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


# ---- DiT models: SD3 and Flux ---------------------------------------------------------------------

# The latent statistics of the real VAEs (their configs' scaling_factor / shift_factor), so that code
# paths that apply them see the same numbers as on the real models.
SD3_LATENT_STATS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_LATENT_STATS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
T5_WIDTH = 64  # d_model of the tiny T5 = joint_attention_dim of the tiny transformers
DIT_WIDTH = 64  # heads x head dim of the tiny transformers (2 x 32)


def tiny_t5_tokenizer():
    """A T5Tokenizer over single characters (a Unigram vocabulary built here: no sentencepiece, no hub).
    ids: <pad> 0, </s> 1, <unk> 2, the word boundary "▁" 3, then the printable ASCII characters."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(chr(c), -3.0) for c in range(ord("!"), ord("~") + 1)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=128,
        d_model=T5_WIDTH,
        d_kv=16,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline: a 2-block SD3Transformer2DModel (width 64, patch 2), two CLIP text
    encoders with projection (32 + 32 = the T5 width 64, pooled 32 + 32), a tiny T5, a 16-channel VAE
    with SD3's scaling / shift factors; default image 32x32."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=DIT_WIDTH // 2,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=DIT_WIDTH,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=flow_scheduler(shift=3.0),
        vae=tiny_vae(seed, latent_channels=16, **SD3_LATENT_STATS),
        text_encoder=tiny_text_encoder(seed, hidden_size=32, projection_dim=32),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(seed + 1, hidden_size=32, projection_dim=32),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=tiny_t5_encoder(seed + 2),
        tokenizer_3=tiny_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline: a FluxTransformer2DModel of 1 double + 1 single block (width 64), a CLIP text
    encoder (pooled width 32), a tiny T5, a 16-channel VAE with Flux's scaling / shift factors.

    ``guidance_embeds=True``: the FLUX.1-dev layout (a guidance embedding, dynamic timestep shifting);
    False: the FLUX.1-schnell layout (no guidance embedding, fixed shift 1)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=DIT_WIDTH // 2,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(8, 12, 12),  # sums to the head dim 32
    )
    if guidance_embeds:  # FLUX.1-dev's scheduler config
        scheduler = flow_scheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:  # FLUX.1-schnell's
        scheduler = flow_scheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(seed, latent_channels=16, **FLUX_LATENT_STATS),
        text_encoder=tiny_text_encoder(seed, hidden_size=32),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_t5_encoder(seed + 2),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# builtin name (after "builtin:") -> the function that builds that pipeline
TINY_PIPELINES = {
    "tiny-sd": tiny_sd_pipeline,
    "tiny-sdxl": tiny_sdxl_pipeline,
    "tiny-sd3": tiny_sd3_pipeline,
    "tiny-flux": tiny_flux_pipeline,
    "tiny-flux-schnell": lambda seed=0: tiny_flux_pipeline(seed, guidance_embeds=False),
}


def save_tiny(name: str, directory: str | os.PathLike, seed: int = 0) -> Path:
    """save_pretrained the tiny pipeline ``name`` (a key of TINY_PIPELINES) to ``directory``."""
    pipe = TINY_PIPELINES[name](seed)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)
