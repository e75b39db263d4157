"""`diffusion-oft train dreambooth|control`: the training scripts as subcommands (same flags)."""

from __future__ import annotations


def register(subparsers) -> None:
    from ..training.args import control_parser, dreambooth_parser

    p = subparsers.add_parser("train", help="train an adapter: a subject (dreambooth) or a spatial control (control)")
    sub = p.add_subparsers(dest="train_task", metavar="TASK", required=True)
    db = sub.add_parser(
        "dreambooth",
        parents=[dreambooth_parser(add_help=False)],
        help="teach a subject from a few photos (flags of diffusers' train_dreambooth_lora.py)",
        description="Teach a subject to a text-to-image model with an orthogonal adapter (DreamBooth-style).",
    )
    db.set_defaults(func=run_dreambooth)
    ctl = sub.add_parser(
        "control",
        parents=[control_parser(add_help=False)],
        help="teach a spatial condition (canny edges, ...) with a condition encoder or a ControlNet",
        description="Teach a text-to-image model to follow a spatial condition with orthogonal adapters.",
    )
    ctl.set_defaults(func=run_control)


def run_dreambooth(args) -> int:
    from ..toyworld.evaluate import judge_adapter
    from ..training.dreambooth import main

    main(args=args, judge=judge_adapter)
    return 0


def run_control(args) -> int:
    from ..training.control import main

    main(args=args)
    return 0
