"""OrthoStableDiffusionPipeline: diffusers' StableDiffusionPipeline with orthogonal adapters."""

from __future__ import annotations

from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .mixin import AdapterArg, OrthoAdapterMixin, ScaleArg


class OrthoStableDiffusionPipeline(OrthoAdapterMixin, StableDiffusionPipeline):
    """Stable Diffusion text-to-image with diffusion-oft adapters.

    ``adapter`` (a file, a list of files or {name: file}) and ``adapter_scale`` (one value or one per
    adapter) can be given to the constructor, ``from_pretrained`` and ``from_pipe``: they stay
    active.  ``__call__`` takes the same two keywords for one call only (names of loaded adapters
    or files)::

        pipe = OrthoStableDiffusionPipeline.from_pretrained(base, adapter="subject.safetensors")
        image = pipe("a photo of sks dog", adapter_scale=0.7).images[0]
    """

    # The annotations are those of StableDiffusionPipeline: diffusers reads them (from_pipe, from_pretrained).
    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
        adapter: AdapterArg = None,
        adapter_scale: ScaleArg = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self._init_ortho_adapters(adapter, adapter_scale)

    def __call__(self, *args, adapter: AdapterArg = None, adapter_scale: ScaleArg = None, **kwargs):
        """StableDiffusionPipeline.__call__ plus ``adapter`` / ``adapter_scale`` for this call."""
        return self._call_with_ortho_adapters(super().__call__, adapter, adapter_scale, *args, **kwargs)
