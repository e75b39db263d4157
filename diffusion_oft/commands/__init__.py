"""Subcommands of the `diffusion-oft` command line (one module each, see diffusion_oft.cli)."""


class CommandError(Exception):
    """A user error: printed as one line, exit code 2."""
