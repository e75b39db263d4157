"""`diffusion-oft convert SRC --to {peft,kohya,diff,merged,diffusion-oft} -o DST`: use an adapter elsewhere.

SRC may be a diffusion-oft file, a PEFT adapter folder (or its adapter_model.safetensors) or a
kohya / LyCORIS file; the format is detected from its keys.
"""

from __future__ import annotations

import warnings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an adapter to PEFT, kohya/LyCORIS (ComfyUI, A1111), full weight deltas or a merged model",
        description=(
            "peft: PEFT OFT/BOFT folder (input-side OFT/BOFT); kohya: LyCORIS oft_blocks file for ComfyUI / A1111 "
            "(output-side OFT/BOFT); diff: kohya-style full weight deltas, any method (needs --model); merged: a "
            "diffusers pipeline or model folder with the adapter folded in (needs --model); diffusion-oft: our "
            "own format (e.g. from a PEFT or kohya file)."
        ),
    )
    p.add_argument("src", help="adapter file or PEFT adapter folder")
    p.add_argument("--to", required=True, choices=["peft", "kohya", "diff", "merged", "diffusion-oft"])
    p.add_argument("-o", "--output", required=True, help="output file (kohya, diff, diffusion-oft) or folder")
    p.add_argument(
        "--model",
        default=None,
        help="base model: diffusers pipeline folder, model folder or hub id (needed for diff and merged; "
        "otherwise optional: exact kohya names and layer sizes)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32", "float64"],
        help="diff only: dtype of the deltas; auto = one step wider than the weights, so W + diff is exact",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..cli import CommandError
    from ..convert import ConversionWarning, convert

    if args.to in ("diff", "merged") and not args.model:
        raise CommandError(f"--to {args.to} needs the base model: --model PIPELINE_OR_MODEL_FOLDER_OR_HUB_ID")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        out = convert(args.src, args.to, args.output, model=args.model, dtype=args.dtype)
    for w in caught:
        if issubclass(w.category, ConversionWarning):
            print(f"note: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {out} ({args.to})")
    return 0
