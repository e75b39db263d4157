"""Controllable Stable Diffusion with a condition encoder and orthogonal adapters (OFT/BOFT setup).

    from diffusion_oft.pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

    pipe = OrthoStableDiffusionControlPipeline.from_pretrained(base, control="my-control-run")  # or:
    pipe = DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/stable_diffusion_oft_control.py",
                                             trust_remote_code=True, control="my-control-run")
    image = pipe("a house", image=edges, control_scale=1.0).images[0]

``control`` is a training output folder (or its adapter file): the adapter is loaded into the UNet and
the paired condition encoder's features are added after ``conv_in`` and each downsampler.
Classifier-free guidance applies the condition to both branches (as diffusers' ControlNet pipeline
does); ``control_guidance_start`` / ``control_guidance_end`` limit it to a fraction of the steps.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ..control import ConditionEncoder, attach_control, load_control


def condition_tensor(image, height: int, width: int, batch: int, per_prompt: int, n_prompts: int) -> torch.Tensor:
    """PIL / numpy / tensor condition(s) -> (batch, 3, height, width) float in [0, 1]."""
    images = image if isinstance(image, list) else [image]
    tensors = []
    for img in images:
        if isinstance(img, torch.Tensor):
            t = img.float()
            t = t if t.ndim == 4 else t[None]
            t = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
            tensors.append(t)
            continue
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img.astype(np.uint8) if img.dtype != np.uint8 else img)
        img = img.convert("RGB").resize((width, height), Image.BILINEAR)
        tensors.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255.0)
    cond = torch.cat(tensors)
    if cond.shape[0] == 1:
        return cond.repeat(batch, 1, 1, 1)
    if cond.shape[0] == n_prompts:
        return cond.repeat_interleave(per_prompt, dim=0)
    if cond.shape[0] == batch:
        return cond
    raise ValueError(f"{cond.shape[0]} condition images for {n_prompts} prompts x {per_prompt} images")


class OrthoStableDiffusionControlPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline + a condition encoder whose features are added after the UNet's conv_in."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        control=None,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder,
            requires_safety_checker,
        )
        self._condition_encoder: ConditionEncoder | None = None
        if control is not None:
            self.load_control(control)

    @property
    def condition_encoder(self) -> ConditionEncoder | None:
        return self._condition_encoder

    def set_condition_encoder(self, encoder: ConditionEncoder | None) -> None:
        if encoder is not None:
            attach_control(self.unet)
        self._condition_encoder = encoder

    def load_control(self, path, adapter_name: str = "default", check_pairing: bool = True) -> ConditionEncoder:
        """Load a control training's adapter (into the UNet) and its paired condition encoder."""
        encoder = load_control(self, path, adapter_name=adapter_name, check_pairing=check_pairing)
        self.set_condition_encoder(encoder)
        return encoder

    def __call__(
        self,
        prompt=None,
        image=None,
        control_scale: float = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        num_images_per_prompt: int = 1,
        callback_on_step_end=None,
        **kwargs,
    ):
        if image is None or self._condition_encoder is None:
            if image is not None:
                raise ValueError("a condition image was given but no condition encoder is loaded (load_control)")
            return super().__call__(
                prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                num_images_per_prompt=num_images_per_prompt,
                callback_on_step_end=callback_on_step_end,
                **kwargs,
            )
        if not 0.0 <= control_guidance_start < control_guidance_end <= 1.0:
            raise ValueError("need 0 <= control_guidance_start < control_guidance_end <= 1")
        first = image[0] if isinstance(image, list) else image
        if height is None or width is None:
            if isinstance(first, Image.Image):
                w0, h0 = first.size
            else:
                h0, w0 = first.shape[-2:] if isinstance(first, torch.Tensor) else first.shape[:2]
            height, width = height or h0, width or w0
        n_prompts = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        if prompt is None and kwargs.get("prompt_embeds") is not None:
            n_prompts = kwargs["prompt_embeds"].shape[0]
        batch = n_prompts * num_images_per_prompt
        cond = condition_tensor(image, height, width, batch, num_images_per_prompt, n_prompts)
        # The encoder keeps its own dtype (it may be a live float32 training module); its input is cast
        # to that dtype inside forward and its output to the UNet's here.
        encoder = self._condition_encoder.to(self._execution_device)
        with torch.no_grad():
            features = [f.to(self.unet.dtype) for f in encoder(cond.to(self._execution_device))]
        state = attach_control(self.unet)

        def active(i: int, n: int) -> bool:  # diffusers' ControlNet rule for step i of n
            return not (i / n < control_guidance_start or (i + 1) / n > control_guidance_end)

        def on_step_end(pipe, i, t, callback_kwargs):
            n = pipe.num_timesteps
            state.scale = control_scale if active(i + 1, n) else 0.0
            if callback_on_step_end is not None:
                return callback_on_step_end(pipe, i, t, callback_kwargs)
            return {}

        state.features = features
        state.scale = control_scale if active(0, num_inference_steps) else 0.0
        try:
            return super().__call__(
                prompt,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                num_images_per_prompt=num_images_per_prompt,
                callback_on_step_end=on_step_end,
                **kwargs,
            )
        finally:
            state.features = None
            state.scale = 1.0
