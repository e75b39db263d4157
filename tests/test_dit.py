"""SD3 and Flux (DiT) models: the built-in tiny ones, adapters in their pipelines, exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

import diffusion_oft as do
from diffusion_oft import cli
from diffusion_oft.config import JOINT_ATTENTION_TARGETS, default_target_modules
from diffusion_oft.files import AdapterFileError
from diffusion_oft.inference import (
    adapted_components,
    base_model_hints,
    merge_adapter,
    set_adapters,
    unmerge_adapter,
)
from diffusion_oft.model_paths import resolve_model_path
from diffusion_oft.tiny import (
    FLUX_LATENT_STATS,
    SD3_LATENT_STATS,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

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


# ---- adapters in SD3 / Flux pipelines -------------------------------------------------------------

CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
MAKERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def add_random_adapters(pipe, method: str = "oft") -> None:
    """A random adapter (not the identity) on the transformer's default DiT targets and the first CLIP."""
    structure = {"block_size": 8} if method in ("oft", "boft") else {"num_blocks": 4}
    dit_targets = default_target_modules(pipe.transformer)
    assert dit_targets == JOINT_ATTENTION_TARGETS
    for module, targets in ((pipe.transformer, dit_targets), (pipe.text_encoder, CLIP_TARGETS)):
        do.add_adapter(module, do.AdapterConfig(method=method, target_modules=targets, init="random", **structure))


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["oft", "ether_plus"])
def test_adapter_saved_and_loaded_into_dit_pipeline_changes_images_and_merges(tmp_path, arch, method):
    base = images(MAKERS[arch]())
    pipe = MAKERS[arch]()
    add_random_adapters(pipe, method)
    paths = [p for p, _ in do.model.named_ortho_layers(pipe.transformer)]
    assert "transformer_blocks.0.attn.add_q_proj" in paths and "transformer_blocks.0.attn.to_add_out" in paths
    if arch == "flux":  # the single blocks' attention too
        assert {f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"} <= set(paths)
    adapted = images(pipe)
    file = do.save_adapter(pipe, tmp_path / "adapter.safetensors")

    fresh = MAKERS[arch]()
    do.load_adapter(fresh, file)
    assert set(adapted_components(fresh)) == {"transformer", "text_encoder"}
    loaded = images(fresh)
    assert torch.equal(loaded, adapted)  # same weights, same adapter tensors, same kernels
    assert (loaded - base).abs().max().item() > 1e-3  # the adapter changes the images
    merge_adapter(fresh)
    merged = images(fresh)
    # merged weights W·Rᵀ (computed in float64, rounded) vs the unmerged float32 path: rounding only
    assert (merged - loaded).abs().max().item() <= 1e-4
    unmerge_adapter(fresh)
    assert torch.equal(images(fresh), loaded)  # unmerge restores the base weights bit for bit
    set_adapters(fresh, ["default"], 0.0)
    assert torch.equal(images(fresh), base)  # scale 0 is the base model
    set_adapters(fresh, ["default"], 1.0)
    assert torch.equal(images(fresh), loaded)


def test_wrong_base_model_is_refused_with_the_first_mismatching_tensor(tmp_path):
    sd = tiny_sd_pipeline()
    do.add_adapter(sd.unet, do.AdapterConfig(method="oft", block_size=8))
    do.add_adapter(sd.text_encoder, do.AdapterConfig(method="oft", block_size=8, target_modules=CLIP_TARGETS))
    sd_file = do.save_adapter(sd, tmp_path / "sd15.safetensors")
    first = min(k for k in load_file(sd_file) if k.startswith("unet."))
    flux = tiny_flux_pipeline()
    with pytest.raises(AdapterFileError) as err:
        do.load_adapter(flux, sd_file)
    message = str(err.value)
    assert "\n" not in message
    assert f"tensor {first!r} is for component 'unet', which this FluxPipeline does not have" in message
    assert not adapted_components(flux)  # nothing was added (the text encoder part would fit: all or nothing)

    sd3 = tiny_sd3_pipeline()
    dit_targets = JOINT_ATTENTION_TARGETS
    do.add_adapter(sd3.transformer, do.AdapterConfig(method="oft", block_size=8, target_modules=dit_targets))
    sd3_file = do.save_adapter(sd3, tmp_path / "sd3.safetensors")
    with pytest.raises(AdapterFileError, match=r"tensor 'transformer\.transformer_blocks\.1\..*"):
        do.load_adapter(flux, sd3_file)  # Flux has one joint block; SD3's second one has no counterpart
    assert not adapted_components(flux)
    hints = base_model_hints(sd3_file)
    assert "transformer width 64" in hints["transformer"] and "SD3Transformer2DModel" in hints["transformer"]


@pytest.mark.slow  # end to end: the command line
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_generate_and_convert_commands_on_builtin_dit_models(builtin_cache, tmp_path, capsys, arch):
    model = f"builtin:tiny-{arch}"
    pipe = DiffusionPipeline.from_pretrained(resolve_model_path(model))
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    add_random_adapters(pipe)
    adapted = images(pipe)
    file = do.save_adapter(pipe, tmp_path / "adapter.safetensors")

    common = ["--prompt", PROMPT, "--num_images", "1", "--steps", "2", "--height", "32", "--width", "32"]
    for name, extra in (("base", []), ("adapted", ["--adapter", str(file), "--scheduler", "flow_euler"])):
        assert cli.main(["generate", "--model", model, *common, *extra, "--output_dir", str(tmp_path / name)]) == 0
    capsys.readouterr()
    # no --guidance_scale: the pipeline's own default (Flux-dev's guidance embedding wants 3.5, not SD's 7.5)
    settings = json.loads((tmp_path / "base" / "generation.json").read_text())
    assert settings["guidance_scale"] == {"sd3": 7.0, "flux": 3.5}[arch]
    pngs = {n: np.asarray(Image.open(tmp_path / n / "000-seed0.png"), dtype=np.int16) for n in ("base", "adapted")}
    assert pngs["base"].shape == (32, 32, 3)
    assert np.abs(pngs["adapted"] - pngs["base"]).max() > 0  # the adapter changes the generated image

    # diff: base weight + diff == the merged weight, for every adapted layer (float64 deltas of float32)
    diff_file = tmp_path / "d.safetensors"
    assert cli.main(["convert", str(file), "--to", "diff", "--model", model, "-o", str(diff_file)]) == 0
    diffs = load_file(diff_file)
    layers = dict(do.model.named_ortho_layers(pipe.transformer))
    assert len([k for k in diffs if k.startswith("lora_transformer_")]) == len(layers)
    for path, layer in layers.items():
        delta = diffs[f"lora_transformer_{path.replace('.', '_')}.diff"]
        merged = layer.adapted_weight(dtype=torch.float64).float()
        assert torch.equal((layer.base_layer.weight.double() + delta).float(), merged), path
    # merged: a plain pipeline folder that generates the adapted images (merge rounding only)
    assert cli.main(["convert", str(file), "--to", "merged", "--model", model, "-o", str(tmp_path / "m")]) == 0
    merged_pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    merged_pipe.set_progress_bar_config(disable=True)
    assert type(merged_pipe) is type(pipe)
    assert not any(isinstance(m, do.OrthoLinear) for m in merged_pipe.transformer.modules())
    got = images(merged_pipe)
    assert (got - adapted).abs().max().item() <= 1e-4
    assert (got - base).abs().max().item() > 1e-3


def test_flux_fuse_qkv_projections_is_refused_until_merged():
    """FluxAttention is no diffusers `Attention` (its own AttentionModuleMixin class): fusing q/k/v copies
    the frozen weights, so with unmerged adapters it would silently drop them."""
    pipe = tiny_flux_pipeline()
    add_random_adapters(pipe)
    adapted = images(pipe)
    with pytest.raises(RuntimeError, match="would drop the orthogonal adapters"):
        pipe.transformer.fuse_qkv_projections()
    assert not pipe.transformer.transformer_blocks[0].attn.fused_projections
    merge_adapter(pipe)
    pipe.transformer.fuse_qkv_projections()
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections
    assert (images(pipe) - adapted).abs().max().item() <= 1e-4  # merge rounding only (see above)
