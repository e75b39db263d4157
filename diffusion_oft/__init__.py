"""diffusion-oft: orthogonal finetuning adapters (OFT, BOFT, ETHER, ETHER+) for diffusers models."""

__version__ = "0.1.0"

from .attention import OrthoAttnProcessor  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .files import AdapterFileError, adapter_info, load_adapter, save_adapter  # noqa: E402

# These accept a whole pipeline as well as a model (diffusion_oft.inference dispatches to model.py).
from .inference import (  # noqa: E402
    load_adapters,
    merge_adapter,
    remove_adapter,
    set_adapter_enabled,
    set_adapters,
    unmerge_adapter,
    use_adapters,
)
from .layers import OrthoLinear  # noqa: E402
from .model import (  # noqa: E402
    adapter_parameters,
    add_adapter,
    apply_constraints,
    count_adapter_parameters,
    find_targets,
)

__all__ = [
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
