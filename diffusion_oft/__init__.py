"""diffusion-oft: orthogonal finetuning adapters (OFT, BOFT, ETHER, ETHER+, HRA) for diffusers models."""

from . import convert as convert  # registers the PEFT / kohya readers of load_adapter (files.register_reader)
from ._version import __version__
from .attention import OrthoAttnProcessor
from .config import AdapterConfig
from .files import AdapterFileError, adapter_info, load_adapter, save_adapter

# These accept a whole pipeline as well as a model (diffusion_oft.inference dispatches to model.py).
from .inference import (
    load_adapters,
    merge_adapter,
    remove_adapter,
    set_adapter_enabled,
    set_adapters,
    unmerge_adapter,
    use_adapters,
)
from .layers import OrthoLinear
from .model import (
    adapter_parameters,
    add_adapter,
    apply_constraints,
    count_adapter_parameters,
    find_targets,
)

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterFileError",
    "OrthoAttnProcessor",
    "OrthoLinear",
    "adapter_info",
    "adapter_parameters",
    "add_adapter",
    "apply_constraints",
    "count_adapter_parameters",
    "find_targets",
    "load_adapter",
    "load_adapters",
    "merge_adapter",
    "remove_adapter",
    "save_adapter",
    "set_adapter_enabled",
    "set_adapters",
    "unmerge_adapter",
    "use_adapters",
]
