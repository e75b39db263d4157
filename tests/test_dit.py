"""SD3 and Flux (DiT) models: the built-in tiny ones, adapters in their pipelines, exports."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffusion_oft.model_paths import resolve_model_path
from diffusion_oft.tiny import FLUX_LATENT_STATS, SD3_LATENT_STATS

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("builtin-cache")
    mp.setenv("DIFFUSION_OFT_CACHE", str(cache))
    yield cache
    mp.undo()


def images(pipe, **kwargs) -> torch.Tensor:
    """Two denoising steps at 32x32 from a fixed seed, as a (1, 32, 32, 3) float tensor."""
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize(
    ("name", "cls", "stats", "guidance"),
    [
        ("builtin:tiny-sd3", StableDiffusion3Pipeline, SD3_LATENT_STATS, None),
        ("builtin:tiny-flux", FluxPipeline, FLUX_LATENT_STATS, True),
        ("builtin:tiny-flux-schnell", FluxPipeline, FLUX_LATENT_STATS, False),
    ],
)
def test_builtin_dit_models_load_offline_and_generate(builtin_cache, name, cls, stats, guidance):
    folder = resolve_model_path(name)
    assert folder.startswith(str(builtin_cache))
    stamp = (builtin_cache / name.split(":")[1] / "model_index.json").stat().st_mtime_ns
    assert resolve_model_path(name) == folder  # cached: the second call writes nothing
    assert (builtin_cache / name.split(":")[1] / "model_index.json").stat().st_mtime_ns == stamp
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.scaling_factor == stats["scaling_factor"]
    assert pipe.vae.config.shift_factor == stats["shift_factor"]
    if guidance is not None:
        assert pipe.transformer.config.guidance_embeds is guidance
        assert pipe.scheduler.config.use_dynamic_shifting is guidance  # dev shifts by resolution, schnell not
    t5 = pipe.text_encoder_3 if cls is StableDiffusion3Pipeline else pipe.text_encoder_2
    tok = pipe.tokenizer_3 if cls is StableDiffusion3Pipeline else pipe.tokenizer_2
    assert type(t5).__name__ == "T5EncoderModel"
    ids = tok(PROMPT).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids  # every character is in the vocab
    image = images(pipe)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert torch.equal(image, images(pipe))  # seeded: the same image twice
