"""diffusers custom pipeline: Stable Diffusion with diffusion-oft adapters.

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline="pipelines/stable_diffusion_oft.py",  # this file
        trust_remote_code=True,  # diffusers 0.42 asks for it for a local custom pipeline file too
        adapter="subject.safetensors",  # optional: a file, a list of files or {name: file}
        adapter_scale=1.0,  # optional: one value or one per adapter
    )
    image = pipe("a photo of sks dog", adapter_scale=0.8).images[0]  # per-call override

The class lives in the diffusion-oft package (``pip install diffusion-oft``); this file only
re-exports it, so it defines exactly one DiffusionPipeline subclass, as diffusers requires, and
stays in step with the installed library.  Same class: ``from diffusion_oft.pipelines import
OrthoStableDiffusionPipeline``.
"""

from diffusion_oft.pipelines.stable_diffusion import OrthoStableDiffusionPipeline

__all__ = ["OrthoStableDiffusionPipeline"]
