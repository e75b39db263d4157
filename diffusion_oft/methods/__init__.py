"""The orthogonal methods: one engine (``base``), one small class per method."""

from .base import METHOD_REGISTRY, OrthoMethod, get_method_class
from .boft import BOFT, OFT
from .ether import ETHER, ETHERPlus

__all__ = ["METHOD_REGISTRY", "OrthoMethod", "get_method_class", "OFT", "BOFT", "ETHER", "ETHERPlus"]
