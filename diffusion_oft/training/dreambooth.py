"""DreamBooth-style subject training with orthogonal adapters (``train_scripts/train_dreambooth.py``):
``main`` picks the trainer, ``subject.DreamBoothTrainer`` (SD / SDXL) or ``dit.DiTDreamBoothTrainer``."""

from __future__ import annotations

from .args import dreambooth_parser, finalize_args
from .dit import DiTDreamBoothTrainer
from .families import family_named
from .subject import DreamBoothTrainer, Judge, check_fits, encode_latents, vae_dtype

__all__ = ["DreamBoothTrainer", "Judge", "check_fits", "encode_latents", "main", "vae_dtype"]


def main(argv: list[str] | None = None, args=None, judge: Judge | None = None) -> dict:
    """Parse (or take) the arguments and train; returns the run summary.  ``judge``: what ``--judge``
    runs after training (``diffusion_oft.toyworld.evaluate.judge_adapter`` for ``--judge toyworld``)."""
    from ..console import setup_console

    setup_console()
    if args is None:
        args = dreambooth_parser().parse_args(argv)
    finalize_args(args, "dreambooth")
    if args.judge and judge is None:
        raise ValueError(
            f"--judge {args.judge}: pass the judge to main(..., judge=...) "
            "(diffusion_oft.toyworld.evaluate.judge_adapter; the command line and train_scripts do)"
        )
    if args.model_family is not None:  # a flow-matching DiT (SD3, Flux): training/dit.py (no judge)
        return DiTDreamBoothTrainer(args, family_named(args.model_family)).run()
    return DreamBoothTrainer(args, judge).run()
