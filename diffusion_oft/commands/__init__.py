"""Subcommands of the `diffusion-oft` command line (one module each, see diffusion_oft.cli)."""
