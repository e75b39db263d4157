"""The standard diffusers / transformers components of the toy-world model, built from configs.

Tokenizer: a CLIP BPE tokenizer whose vocab.json / merges.txt this module writes: the 512 byte
symbols of CLIP (so any text still tokenizes, character by character) plus whole-word tokens for the
world's words, built by left-to-right merges.  Rare identifiers ("sks", ...) are whole-word tokens
that no pretraining caption uses, so their embeddings stay untrained — free for DreamBooth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..tiny import byte_symbols
from .world import ALL_SHAPES, BACKGROUNDS, PALETTE, SUBJECT_CLASS, SUBJECT_TOKEN

MAX_TOKENS = 24  # tokenizer.model_max_length: captions of the world are ≤ 12 tokens
RARE_TOKENS = (SUBJECT_TOKEN, "ohwx", "zwx", "xyz")
WORDS = sorted(
    set(PALETTE)
    | set(ALL_SHAPES)
    | set(BACKGROUNDS)
    | set(RARE_TOKENS)
    | {
        SUBJECT_CLASS,
        "a",
        "an",
        "the",
        "on",
        "of",
        "in",
        "with",
        "and",
        "photo",
        "picture",
        "image",
        "background",
        "object",
        "shape",
        "small",
        "large",
        "left",
        "right",
        "top",
        "bottom",
        "striped",
        "dotted",
        "checkered",
    }
)


def _bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word's symbols: repeatedly apply the highest-priority merge."""
    rank = {m: i for i, m in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def write_tokenizer_files(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        # Tokenize the word with the merges so far (as BPE will), then chain its pieces left to right
        # with new, lower-priority merges: earlier words keep their tokenization.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return directory


def make_tokenizer(directory: str | os.PathLike):
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory)
    tok = CLIPTokenizer.from_pretrained(str(directory), model_max_length=MAX_TOKENS)
    tok.save_pretrained(str(directory))
    return tok


def make_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=64,
    )
    return CLIPTextModel(config)


def make_vae(
    block_out_channels: tuple[int, ...] = (16, 32, 32), latent_channels: int = 4, logvar_init: float | None = None
):
    """64×64×3 ↔ 16×16×``latent_channels`` (three blocks: downsampling factor 4).  ``logvar_init`` sets the
    initial log-variance of the posterior (``quant_conv``'s bias for those channels): a low value (e.g. −6)
    starts it nearly deterministic, so the decoder sees the image, not noise, from the first step."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
    )
    if logvar_init is not None:
        import torch

        with torch.no_grad():
            vae.quant_conv.bias[latent_channels:] = logvar_init  # quant_conv: (mean, logvar) per channel
    return vae


def make_unet(latent_channels: int = 4):
    """Cross-attention at 16×16 and 8×8 latents, 32 / 64 / 64 channels, 64-dim text (~1.5 M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        steps_offset=1,
    )
