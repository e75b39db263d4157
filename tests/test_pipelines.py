"""Adapters inside diffusers pipelines: each pipeline class, the custom pipeline, composition.

Everything runs on tiny components built from configs (no hub), 16x16 images, 2 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

import diffusion_oft as do
from diffusion_oft import inference
from diffusion_oft.files import AdapterFileError
from diffusion_oft.layers import OrthoLinear
from diffusion_oft.pipelines import OrthoStableDiffusionPipeline
from diffusion_oft.tiny import save_tiny_sd, tiny_sd_components, tiny_sdxl_pipeline

PIPELINE_FILE = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "pipelines" / "stable_diffusion_oft.py")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


# ---- tiny pipelines of every class ----------------------------------------------------------------


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd(seed: int = 0, cls=StableDiffusionPipeline):
    return _quiet(cls(**tiny_sd_components(seed), requires_safety_checker=False))


def make_inpaint(seed: int = 0):
    components = tiny_sd_components(seed)
    torch.manual_seed(seed)  # the inpainting UNet: 4 latent + 1 mask + 4 masked-image channels
    components["unet"] = UNet2DConditionModel.from_config({**components["unet"].config, "in_channels": 9})
    return _quiet(StableDiffusionInpaintPipeline(**components, requires_safety_checker=False))


def make_controlnet(seed: int = 0):
    components = tiny_sd_components(seed)
    controlnet = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(seed + 100)  # the zero-initialised output convs would hide the ControlNet entirely
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn_like(p) * 0.1)
    return _quiet(StableDiffusionControlNetPipeline(**components, controlnet=controlnet, requires_safety_checker=False))


def _image(mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        return Image.fromarray(mask, "L")
    return Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")


CALL_KWARGS = {
    "sd": {},
    "img2img": {"image": _image(), "strength": 1.0},
    "inpaint": {"image": _image(), "mask_image": _image("L"), "strength": 1.0},
    "sdxl": {},
    "controlnet": {"image": _image(seed=1)},
    "auto_t2i": {},
}


def generate(pipe, kind: str = "sd", **kwargs) -> np.ndarray:
    kwargs = {**CALL_KWARGS[kind], **kwargs}
    if kind not in ("img2img", "inpaint"):
        kwargs.setdefault("height", 16)
        kwargs.setdefault("width", 16)
    return pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def oft(**kw):
    return do.AdapterConfig(method="oft", block_size=8, init="random", **kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    """Two adapter files for the tiny SD: 'subject' (OFT on the UNet) and 'style' (BOFT on the
    UNet + OFT on the text encoder)."""
    folder = tmp_path_factory.mktemp("adapters")
    pipe = make_sd()
    do.add_adapter(pipe.unet, oft())
    subject = do.save_adapter(pipe, folder / "subject.safetensors")
    pipe = make_sd()
    do.add_adapter(pipe.unet, do.AdapterConfig(method="boft", block_size=4, n_butterfly_factors=2, init="random"))
    do.add_adapter(pipe.text_encoder, oft(target_modules=TEXT_TARGETS))
    style = do.save_adapter(pipe, folder / "style.safetensors")
    return {"subject": subject, "style": style}


# ---- load_adapter on each pipeline class -----------------------------------------------------------


def _adapt(pipe, kind: str) -> None:
    """Put random adapters on the parts of ``pipe`` an adapter file of that class would carry."""
    if kind == "img2img":
        do.add_adapter(pipe.unet, do.AdapterConfig(method="boft", block_size=4, n_butterfly_factors=2, init="random"))
    elif kind == "inpaint":
        do.add_adapter(pipe.unet, do.AdapterConfig(method="ether", num_blocks=2))
    else:
        do.add_adapter(pipe.unet, oft())
    if kind == "sdxl":
        do.add_adapter(pipe.text_encoder, oft(target_modules=TEXT_TARGETS))
        do.add_adapter(
            pipe.text_encoder_2,
            do.AdapterConfig(method="ether_plus", num_blocks=2, init="random", target_modules=TEXT_TARGETS),
        )
    if kind == "controlnet":
        do.add_adapter(
            pipe.controlnet, do.AdapterConfig(method="boft", block_size=4, n_butterfly_factors=2, init="random")
        )


FACTORIES = {
    "sd": make_sd,
    "img2img": lambda seed=0: make_sd(seed, StableDiffusionImg2ImgPipeline),
    "inpaint": make_inpaint,
    "sdxl": lambda seed=0: _quiet(tiny_sdxl_pipeline(seed)),
    "controlnet": make_controlnet,
}
EXPECTED_COMPONENTS = {
    "sd": {"unet"},
    "img2img": {"unet"},
    "inpaint": {"unet"},
    "sdxl": {"unet", "text_encoder", "text_encoder_2"},
    "controlnet": {"unet", "controlnet"},
}


def assert_images_close(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> None:
    """Images of two pipeline instances with equal weights: equal up to float32 rounding (bit-exact
    comparisons are kept for one instance, where the same kernels see the same inputs)."""
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= atol, np.abs(a - b).max()


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_load_adapter_into_each_pipeline_class(tmp_path, kind):
    source = FACTORIES[kind]()
    _adapt(source, kind)
    expected = generate(source, kind)
    path = do.save_adapter(source, tmp_path / f"{kind}.safetensors")
    assert set(do.adapter_info(path)["components"]) == EXPECTED_COMPONENTS[kind]

    pipe = FACTORIES[kind]()
    base = generate(pipe, kind)
    assert np.abs(expected - base).max() > 1e-3  # the adapter changes the images
    do.load_adapter(pipe, path)  # the one-liner: finds unet / text encoders / controlnet from the file
    assert set(inference.adapted_components(pipe)) == EXPECTED_COMPONENTS[kind]
    assert np.array_equal(generate(pipe, kind), expected)  # bit-exact through the file
    do.set_adapter_enabled(pipe, False)  # pipeline-level: every adapted component
    assert np.array_equal(generate(pipe, kind), base)
    do.set_adapter_enabled(pipe, True)
    do.remove_adapter(pipe)
    assert not inference.adapted_components(pipe)
    assert np.array_equal(generate(pipe, kind), base)


def test_multi_controlnet_takes_the_adapter_per_net(tmp_path):
    source = make_controlnet()
    _adapt(source, "controlnet")
    path = do.save_adapter(source, tmp_path / "controlnet.safetensors")
    single = make_controlnet()
    components = {k: v for k, v in single.components.items() if k != "controlnet"}
    second = make_controlnet(seed=1).controlnet
    pipe = _quiet(StableDiffusionControlNetPipeline(**components, controlnet=[single.controlnet, second]))
    kwargs = {"image": [_image(seed=1), _image(seed=2)]}
    base = generate(pipe, "sd", **kwargs)
    do.load_adapter(pipe.unet, path, component="unet")  # one part of a two-component file
    for net in pipe.controlnet.nets:
        do.load_adapter(net, path, component="controlnet")
    assert set(inference.adapted_components(pipe)) == {"unet", "controlnet.nets.0", "controlnet.nets.1"}
    assert np.abs(generate(pipe, "sd", **kwargs) - base).max() > 1e-3
    do.set_adapter_enabled(pipe, False)  # pipeline-level helpers reach the nets
    assert np.array_equal(generate(pipe, "sd", **kwargs), base)


def test_auto_pipelines_load_and_share_adapters(tiny_dir, sd_files):
    pipe = _quiet(AutoPipelineForText2Image.from_pretrained(tiny_dir))
    assert type(pipe) is StableDiffusionPipeline
    base = generate(pipe, "auto_t2i")
    do.load_adapter(pipe, sd_files["subject"])
    adapted = generate(pipe, "auto_t2i")
    assert np.abs(adapted - base).max() > 1e-3
    reference = make_sd()  # the same tiny weights (seed 0) through the plain pipeline
    do.load_adapter(reference, sd_files["subject"])
    # Another pipeline instance (built in memory, not read from the folder): the same weights, but tensors of
    # other memory layout and alignment, for which BLAS may pick other kernels: equal to float rounding, not
    # bit for bit on every CPU (measured ~1e-7 apart on an AMD EPYC).
    assert_images_close(generate(reference, "auto_t2i"), adapted)
    # from_pipe shares the components, so the adapters come along and switch together
    img2img = _quiet(AutoPipelineForImage2Image.from_pipe(pipe))
    assert type(img2img) is StableDiffusionImg2ImgPipeline
    assert set(inference.adapted_components(img2img)) == {"unet"}
    do.set_adapter_enabled(img2img, False)
    assert np.array_equal(generate(pipe, "auto_t2i"), base)


def test_load_adapter_refuses_a_file_for_another_pipeline(tmp_path):
    source = _quiet(tiny_sdxl_pipeline())
    _adapt(source, "sdxl")
    path = do.save_adapter(source, tmp_path / "sdxl.safetensors")
    pipe = make_sd()
    with pytest.raises(AdapterFileError, match="another base model|text_encoder_2"):
        do.load_adapter(pipe, path)
    assert not any(isinstance(m, OrthoLinear) for m in pipe.unet.modules())  # nothing changed


# ---- the custom pipeline -----------------------------------------------------------------------------


def test_custom_pipeline_file_loads_with_from_pretrained(tiny_dir, sd_files):
    pipe = DiffusionPipeline.from_pretrained(
        tiny_dir,
        custom_pipeline=PIPELINE_FILE,
        trust_remote_code=True,
        adapter=sd_files["subject"],
        adapter_scale=0.5,
    )
    _quiet(pipe)
    # the file re-exports the package's class: one class, importable from both places
    assert type(pipe) is OrthoStableDiffusionPipeline
    assert pipe.ortho_adapters == {"subject": 0.5}
    reference = make_sd()
    do.load_adapter(reference, sd_files["subject"], adapter_name="subject")
    do.set_adapters(reference, ["subject"], [0.5])
    half = generate(pipe)
    assert_images_close(half, generate(reference))  # another instance: see test_auto_pipelines_...
    base = generate(make_sd())
    assert_images_close(generate(pipe, adapter_scale=0.0), base)  # per call only ...
    assert pipe.ortho_adapters == {"subject": 0.5}  # ... the pipeline's own scale is kept
    assert np.array_equal(generate(pipe), half)


def test_custom_pipeline_per_call_adapters_and_from_pipe(sd_files):
    plain = make_sd()
    base = generate(plain)
    pipe = _quiet(OrthoStableDiffusionPipeline.from_pipe(plain))
    assert pipe.ortho_adapters == {}
    both = generate(pipe, adapter=[sd_files["subject"], sd_files["style"]], adapter_scale=[1.0, 0.5])
    assert np.abs(both - base).max() > 1e-3
    assert pipe.ortho_adapters == {}  # loaded on first use, active only for that call
    assert np.array_equal(generate(pipe), base)
    assert np.array_equal(generate(pipe, adapter=["subject", "style"], adapter_scale=[1.0, 0.5]), both)
    names = pipe.load_ortho_adapter({"s": sd_files["subject"]}, scale=0.7)
    assert names == ["s"] and pipe.ortho_adapters == {"s": 0.7}
    pipe.merge_ortho_adapters()
    with pytest.raises(RuntimeError, match="unmerge"):
        generate(pipe, adapter="style")
    pipe.unmerge_ortho_adapters()
    pipe.remove_ortho_adapter()
    assert np.allclose(generate(pipe), base, atol=1e-5)  # unmerging restores the weights to float rounding


# ---- several adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first,second",
    [
        (dict(method="oft", block_size=4), dict(method="oft", block_size=8)),
        (dict(method="boft", block_size=4, n_butterfly_factors=2), dict(method="ether", num_blocks=2)),
        (dict(method="ether", num_blocks=4), dict(method="oft", block_size=4, cayley_mode="neumann")),
    ],
)
def test_composition_is_the_product_and_stays_orthogonal(first, second):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(16))  # then the adapted weight is the transform itself: W' = I·R₁ᵀR₂ᵀ
    layer = OrthoLinear(linear)
    for name, kwargs in (("one", first), ("two", second)):
        config = do.AdapterConfig(**kwargs, init="random" if kwargs["method"] != "ether" else "default")
        layer.add_adapter(name, do.methods.get_method_class(config.method)(16, 16, config))
    with torch.no_grad():
        for p in layer.parameters():
            if p is not linear.weight:
                p.mul_(2.0)  # well away from the identity
        r1 = layer.adapted_weight(["one"]).T
        r2 = layer.adapted_weight(["two"]).T
        composed = layer.adapted_weight(["one", "two"]).T  # W' = W (R₂R₁)ᵀ
    eye = torch.eye(16)
    assert (r1 - eye).norm() > 0.1 and (r2 - eye).norm() > 0.1
    tol = 1e-4 if second.get("cayley_mode") != "neumann" else 5e-2  # Neumann is approximately orthogonal
    assert torch.allclose(composed, r2 @ r1, atol=1e-5)
    assert torch.allclose(composed @ composed.T, eye, atol=tol)
    assert not torch.allclose(r2 @ r1, r1 @ r2, atol=1e-3)  # the order matters


def test_set_adapters_switches_and_composes_on_a_pipeline(sd_files):
    pipe = make_sd()
    base = generate(pipe)
    names = do.inference.load_adapters(pipe, [sd_files["subject"], sd_files["style"]])
    assert names == ["subject", "style"]
    assert set(inference.adapted_components(pipe)) == {"unet", "text_encoder"}
    assert pipe.text_encoder.ortho_adapter_configs.keys() == {"style"}
    both = generate(pipe)
    # the composed transform keeps the neurons' angles: W'W'ᵀ = W(R₂R₁)ᵀ(R₂R₁)Wᵀ = WWᵀ
    for layer in do.model.ortho_layers(pipe.unet):
        w = layer.base_layer.weight.double()
        w2 = layer.adapted_weight(["subject", "style"], dtype=torch.float64)
        assert torch.allclose(w2 @ w2.T, w @ w.T, atol=1e-4 * w.norm().item() ** 2 / w.shape[0])

    singles = {}
    for name in names:
        do.set_adapters(pipe, name)
        assert inference.active_adapters(pipe) == {name: 1.0}
        singles[name] = generate(pipe)
        alone = make_sd()
        do.load_adapter(alone, sd_files[name])
        assert np.array_equal(singles[name], generate(alone))
    assert np.abs(singles["subject"] - singles["style"]).max() > 1e-3
    do.set_adapters(pipe, ["style", "subject"])  # the other order is another composition
    assert np.abs(generate(pipe) - both).max() > 1e-6
    do.set_adapters(pipe, names, [0.0, 0.0])  # scale 0 is the identity for every method
    assert np.allclose(generate(pipe), base, atol=1e-6)
    do.set_adapters(pipe, names)
    assert np.array_equal(generate(pipe), both)
    with pytest.raises(ValueError, match="unknown adapters"):
        do.set_adapters(pipe, ["nope"])
    with do.inference.use_adapters(pipe, "subject", 0.0):  # temporarily
        assert np.allclose(generate(pipe), base, atol=1e-6)
    assert inference.active_adapters(pipe) == {"subject": 1.0, "style": 1.0}

    do.merge_adapter(pipe)  # merges every adapted component
    assert np.allclose(generate(pipe), both, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        do.set_adapters(pipe, "subject")
    do.unmerge_adapter(pipe)
    do.remove_adapter(pipe, "style")
    assert set(inference.adapted_components(pipe)) == {"unet"}
    assert np.allclose(generate(pipe), singles["subject"], atol=1e-5)  # after unmerge: float rounding


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_cayley_scale_keeps_r_orthogonal(method):
    kwargs = dict(block_size=4, n_butterfly_factors=2) if method == "boft" else dict(block_size=4)
    config = do.AdapterConfig(method=method, init="random", **kwargs)
    adapter = do.methods.get_method_class(method)(16, 16, config)
    with torch.no_grad():
        adapter.skew.mul_(5.0)
    eye = torch.eye(16)

    def matrix(scale):
        with torch.no_grad():
            return adapter.transforms(scale)["input"].right_mul(eye)  # I·R(s)

    for scale in (0.0, 0.3, 1.0, 2.5, -1.0):
        r = matrix(scale)
        assert torch.allclose(r @ r.T, eye, atol=1e-5), scale
    assert torch.allclose(matrix(0.0), eye)
    assert (matrix(0.5) - eye).norm() < (matrix(1.0) - eye).norm()  # a path away from the identity
    if method == "oft":
        assert torch.allclose(matrix(1.0) @ matrix(-1.0), eye, atol=1e-5)  # R(−1) = R⁻¹


def test_load_adapters_is_all_or_nothing(tmp_path, sd_files):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    pipe = make_sd()
    with pytest.raises(AdapterFileError, match="broken.safetensors"):
        do.inference.load_adapters(pipe, [sd_files["subject"], broken])
    assert not inference.adapted_components(pipe)
    assert not any(isinstance(m, OrthoLinear) for m in pipe.unet.modules())
    with pytest.raises(ValueError, match="weights"):
        do.inference.load_adapters(pipe, [sd_files["subject"]], weights=[1.0, 2.0])


def test_loaded_adapters_follow_the_model_mode(sd_files):
    pipe = make_sd()
    pipe.unet.eval()  # as from_pretrained leaves it
    do.load_adapter(pipe, sd_files["subject"])
    layers = do.model.ortho_layers(pipe.unet)
    assert not any(m.training for layer in layers for m in layer.modules())
    generate(pipe)
    assert all(layer._cache is not None for layer in layers)  # the adapted weights are computed once
