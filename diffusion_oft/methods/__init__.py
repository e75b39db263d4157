"""The orthogonal methods: one engine (``base``), one small class per method."""

from .base import METHOD_REGISTRY, OrthoMethod, get_method_class, method_names
from .boft import BOFT, OFT
from .ether import ETHER, ETHERPlus
from .hra import HRA

__all__ = [
    "METHOD_REGISTRY",
    "OrthoMethod",
    "get_method_class",
    "method_names",
    "OFT",
    "BOFT",
    "ETHER",
    "ETHERPlus",
    "HRA",
]
