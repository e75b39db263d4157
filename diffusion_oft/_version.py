"""The one place of the package version (``pyproject.toml`` reads it: ``[tool.setuptools.dynamic]``)."""

__version__ = "0.1.0"
