"""diffusers custom pipeline: controllable Stable Diffusion with a condition encoder + orthogonal adapters.

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline="pipelines/stable_diffusion_oft_control.py",  # this file
        trust_remote_code=True,
        control="canny-oft",  # a `diffusion-oft train control` output folder (adapter + condition encoder)
    )
    image = pipe("a bird", image=canny_edges, control_scale=1.0).images[0]

The class lives in the diffusion-oft package; this file only re-exports it (exactly one
DiffusionPipeline subclass, as diffusers requires).  Same class:
``from diffusion_oft.pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline``.
"""

from diffusion_oft.pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

__all__ = ["OrthoStableDiffusionControlPipeline"]
