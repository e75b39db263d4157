"""diffusers' speed and memory features keep the adapters after load_adapter.

On CPU: attention slicing, torch.compile (the "eager" backend: Dynamo's graph capture and guards,
without Inductor's minutes of C++ compilation), model CPU offload (accelerate's hooks, with the
CPU as the "accelerator"), fused QKV refusal.  On a CUDA machine also: Inductor, model CPU offload
to the GPU, xformers (skipped elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pipelines import TEXT_TARGETS, generate, make_sd, oft

import diffusion_oft as do
from diffusion_oft import inference
from diffusion_oft.pipelines import OrthoStableDiffusionPipeline

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    pipe = make_sd()
    do.add_adapter(pipe.unet, oft())
    do.add_adapter(pipe.text_encoder, oft(target_modules=TEXT_TARGETS))
    return do.save_adapter(pipe, tmp_path_factory.mktemp("adapter") / "adapter.safetensors")


@pytest.fixture(scope="module")
def reference(adapter_file):
    """(base images, adapted images) of the plain pipeline."""
    pipe = make_sd()
    base = generate(pipe)
    do.load_adapter(pipe, adapter_file)
    return base, generate(pipe)


def test_attention_slicing_keeps_the_adapters(adapter_file, reference):
    base, adapted = reference
    pipe = make_sd()
    do.load_adapter(pipe, adapter_file)
    pipe.enable_attention_slicing(1)  # replaces every attention processor
    assert np.allclose(generate(pipe), adapted, atol=1e-5)
    pipe.disable_attention_slicing()
    assert np.allclose(generate(pipe), adapted, atol=1e-5)


def test_custom_pipeline_scale_works_under_any_attention_processor(adapter_file, reference):
    # cross_attention_kwargs={"ortho_scale": ...} needs OrthoAttnProcessor (the sliced processor drops
    # unknown keys); the pipeline's adapter_scale sets the scales on the layers, so it always works.
    base, adapted = reference
    pipe = OrthoStableDiffusionPipeline.from_pipe(make_sd(), adapter=adapter_file)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_attention_slicing(1)
    assert np.allclose(generate(pipe, adapter_scale=0.0), base, atol=1e-5)
    assert np.allclose(generate(pipe), adapted, atol=1e-5)


@pytest.mark.slow  # torch.compile
def test_torch_compile_before_or_after_load_adapter(adapter_file, reference):
    base, adapted = reference
    pipe = make_sd()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    assert np.array_equal(generate(pipe), base)
    do.load_adapter(pipe, adapter_file)  # into the compiled UNet: Dynamo's guards see the change
    assert set(inference.adapted_components(pipe)) == {"unet", "text_encoder"}
    assert np.allclose(generate(pipe), adapted, atol=1e-6)
    do.set_adapter_enabled(pipe, False)
    assert np.allclose(generate(pipe), base, atol=1e-6)


def test_model_cpu_offload_hooks_keep_the_adapters(adapter_file, reference):
    base, adapted = reference
    pipe = make_sd()
    do.load_adapter(pipe, adapter_file)
    device = "cuda" if CUDA else "cpu"  # on CPU only accelerate's hooks run (nothing moves)
    pipe.enable_model_cpu_offload(device=device)
    assert np.allclose(generate(pipe), adapted, atol=1e-3 if CUDA else 0)
    do.set_adapter_enabled(pipe, False)
    assert np.allclose(generate(pipe), base, atol=1e-3 if CUDA else 0)
    pipe.remove_all_hooks()


def test_fusing_qkv_needs_merged_adapters(adapter_file, reference):
    pipe = make_sd()
    do.load_adapter(pipe, adapter_file)
    with pytest.raises(RuntimeError, match="merge_adapter"):
        pipe.unet.fuse_qkv_projections()
    do.merge_adapter(pipe)
    pipe.unet.fuse_qkv_projections()
    assert np.allclose(generate(pipe), reference[1], atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="Inductor on CPU compiles for minutes; run on a CUDA machine")
def test_inductor_compile_on_gpu(adapter_file, reference):
    pipe = make_sd().to("cuda")
    do.load_adapter(pipe, adapter_file)
    pipe.unet = torch.compile(pipe.unet)
    assert np.allclose(generate(pipe), reference[1], atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="xformers runs on CUDA only")
def test_xformers_keeps_the_adapters(adapter_file, reference):
    pytest.importorskip("xformers")
    pipe = make_sd().to("cuda")
    do.load_adapter(pipe, adapter_file)
    pipe.enable_xformers_memory_efficient_attention()
    assert np.allclose(generate(pipe), reference[1], atol=1e-3)
