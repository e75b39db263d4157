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
    ctl.add_argument(
        "--toyworld_scenes",
        type=int,
        default=None,
        metavar="N",
        help="toy model: train on N (image, Canny, caption) triples rendered from the toy world (seed 2000, "
        "the first 120 are assets/control's) into <output_dir>/toyworld_data, instead of --train_data_dir",
    )
    ctl.set_defaults(func=run_control)


def run_dreambooth(args) -> int:
    from ..toyworld.evaluate import judge_adapter
    from ..training.dreambooth import main

    main(args=args, judge=judge_adapter)
    return 0


def run_control(args) -> int:
    from ..training.control import main

    if args.toyworld_scenes is not None:
        args.train_data_dir = str(toyworld_control_data(args))
    main(args=args)
    return 0


def toyworld_control_data(args):
    """Render --toyworld_scenes triples into <output_dir>/toyworld_data (kept: a resumed run reuses it)."""
    from pathlib import Path

    from ..commands import CommandError
    from ..toyworld.datasets import write_control_dataset

    n = args.toyworld_scenes
    if n < 1:
        raise CommandError(f"--toyworld_scenes must be >= 1, got {n}")
    if args.train_data_dir is not None or args.dataset_name is not None:
        raise CommandError("--toyworld_scenes renders its own data: drop --train_data_dir / --dataset_name")
    folder = Path(args.output_dir) / "toyworld_data"
    meta = folder / "metadata.jsonl"
    if not (meta.is_file() and len(meta.read_text(encoding="utf-8").splitlines()) == n):
        write_control_dataset(folder, n=n)
    return folder
