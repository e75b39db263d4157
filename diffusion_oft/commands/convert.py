"""`diffusion-oft convert SRC --to {peft,kohya,diff,merged,lora,kohya-lora,diffusion-oft} -o DST`: use an
adapter elsewhere.

SRC may be a diffusion-oft file, a PEFT adapter folder (or its adapter_model.safetensors) or a
kohya / LyCORIS file; the format is detected from its keys.
"""

from __future__ import annotations

import argparse
import textwrap
import warnings

from ..convert import FORMATS, NEEDS_MODEL
from ..convert.lora import DEFAULT_MAX_ERROR
from . import CommandError

# What each client does with each export, as measured on their code (see README, "Use it elsewhere").
CLIENT_NOTES = """client notes (measured on ComfyUI 0.3.64, A1111 before and from 1.9, diffusers 0.42):
  lora        diffusers pipe.load_lora_weights (also set_adapters / fuse_lora): exact for ETHER/ETHER+, the
              printed error for OFT/BOFT. Mixed ranks need diffusers >= 0.34 (it reads lora_adapter_metadata);
              before that give --rank R (one rank everywhere).
  kohya-lora  kohya's plain LoRA layout, the one ComfyUI, A1111 and Forge load (their loading not run here;
              diffusers' kohya reader tested); the same error as lora.
  kohya       LyCORIS oft_blocks, output side only (train with --side output):
              ComfyUI 0.3.6x: OFT and BOFT exact, but ignores 'rescale' for OFT (an OFT + magnitude file is then
                ~25% off): use diff or lora there; applies 'rescale' for BOFT.
              A1111 >= 1.9: OFT and BOFT exact with 'rescale'; reads alpha = 0 as no constraint.
              A1111 < 1.9: no BOFT loader, ignores 'rescale', alpha = 0 switches OFT off: use diff or lora.
  diff        ComfyUI and A1111 (every version): exact full weight deltas (cast to the weight's dtype).
  merged      anything that loads a diffusers folder."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert an adapter to PEFT, kohya/LyCORIS (ComfyUI, A1111), a LoRA, full weight deltas or a merged model",
        description=textwrap.fill(
            "peft: PEFT OFT/BOFT folder (input-side OFT/BOFT); kohya: LyCORIS oft_blocks file for ComfyUI / A1111 "
            "(output-side OFT/BOFT); diff: kohya-style full weight deltas, any method (needs --model); merged: a "
            "diffusers pipeline or model folder with the adapter folded in (needs --model); lora: a LoRA that "
            "diffusers' pipe.load_lora_weights reads (folder or .safetensors file; exact for ETHER/ETHER+, a "
            "truncated SVD for OFT/BOFT; needs --model); kohya-lora: the same LoRA in kohya's layout (ComfyUI, "
            "A1111, Forge); diffusion-oft: our own format (e.g. from a PEFT or kohya file).",
            width=100,
        ),
        epilog=CLIENT_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="adapter file or PEFT adapter folder")
    p.add_argument("--to", required=True, choices=list(FORMATS))
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file (kohya, diff, kohya-lora, diffusion-oft; lora: either) or folder",
    )
    p.add_argument(
        "--model",
        default=None,
        help="base model: diffusers pipeline folder, model folder or hub id (needed for diff, merged, lora and "
        "kohya-lora; otherwise optional: exact kohya names and layer sizes)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32", "float64"],
        help="diff only: dtype of the deltas; auto = one step wider than the weights, so W + diff is exact",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="lora / kohya-lora: at most this rank per layer (OFT/BOFT: the truncated SVD; ETHER/ETHER+ are exact "
        "at their own rank unless this cuts it)",
    )
    p.add_argument(
        "--max_error",
        type=float,
        default=None,
        help="lora / kohya-lora: the smallest rank per layer whose relative Frobenius error of the weight change "
        f"is at most this (default for OFT/BOFT: {DEFAULT_MAX_ERROR}; ETHER/ETHER+: exact)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert import ConversionWarning, convert

    if args.to in NEEDS_MODEL and not args.model:
        raise CommandError(f"--to {args.to} needs the base model: --model PIPELINE_OR_MODEL_FOLDER_OR_HUB_ID")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        out = convert(
            args.src,
            args.to,
            args.output,
            model=args.model,
            dtype=args.dtype,
            rank=args.rank,
            max_error=args.max_error,
            log=print,
        )
    for w in caught:
        if issubclass(w.category, ConversionWarning):
            print(f"note: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.to not in ("lora", "kohya-lora") and (args.rank is not None or args.max_error is not None):
        print(f"note: --rank and --max_error apply to lora and kohya-lora only; ignored for --to {args.to}")
    print(f"wrote {out} ({args.to})")
    return 0
