"""The project's diffusers pipelines.

Each is also shipped as a diffusers custom-pipeline file in the repository's ``pipelines/`` folder
(``DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/<file>.py",
trust_remote_code=True)``); those files only re-export the classes defined here.

``OrthoAdapterMixin`` gives any diffusers pipeline the adapter methods and the ``adapter=`` /
``adapter_scale=`` keywords (of ``__init__``/``from_pretrained`` and of ``__call__``); the
controllable pipeline of the control issue can reuse it.
"""

from .mixin import OrthoAdapterMixin
from .stable_diffusion import OrthoStableDiffusionPipeline

__all__ = ["OrthoAdapterMixin", "OrthoStableDiffusionPipeline"]
