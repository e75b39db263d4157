"""What the command line shows: our warnings as one plain line, no noise about packages we do not use."""

from __future__ import annotations

import logging
import warnings


class UserFacingWarning(UserWarning):
    """A warning meant for the user of a command (bad data skipped, ...): printed as ``warning: <text>``,
    without the source file and line that Python's default format puts in front."""


class _DropUnneededBackendNotes(logging.Filter):
    """transformers' notes that an optional backend (torchvision, for image processors diffusers imports
    but our commands never run) is missing and a fallback is used."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_default_formatwarning = warnings.formatwarning


def _formatwarning(message, category, filename, lineno, line=None) -> str:
    if isinstance(category, type) and issubclass(category, UserFacingWarning):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def setup_console() -> None:
    """Install both (idempotent); called by the `diffusion-oft` command and the training scripts."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropUnneededBackendNotes) for f in logger.filters):
        logger.addFilter(_DropUnneededBackendNotes())
    warnings.formatwarning = _formatwarning
