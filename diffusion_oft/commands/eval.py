"""`diffusion-oft eval control`: control fidelity (edge IoU / F1) of a control training's output."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a trained adapter (control: edge IoU / F1)")
    sub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    c = sub.add_parser(
        "control",
        help="Canny control fidelity of a `train control` output, with a grid",
        description="Generate from edge maps and score the Canny edges of the outputs against "
        "them (IoU, F1), with and without the control; writes a table, JSON and a grid.",
    )
    c.add_argument(
        "--pretrained_model_name_or_path", required=True, help="base model (hub id, folder, builtin:tiny-sd)"
    )
    c.add_argument("--control", required=True, help="a `train control` output folder (or its adapter file)")
    c.add_argument(
        "--data_dir", default=None, help="folder with metadata.jsonl (image, optional conditioning_image, text)"
    )
    c.add_argument(
        "--toyworld",
        action="store_true",
        help="instead of --data_dir: the toy world's held-out outlines and hand-drawn outlines at "
        "control scales 0, 0.5, 1 (box IoU of the judged object vs the outline, edge F1, colour and "
        "shape kept) and the VAE ceiling; for assets/toy-sd",
    )
    c.add_argument(
        "--condition",
        default="canny",
        choices=["canny", "none"],
        help="canny: edges of each image are the input; none: read conditioning_image (an edge map)",
    )
    c.add_argument("--image_column", default="image")
    c.add_argument("--conditioning_image_column", default="conditioning_image")
    c.add_argument("--caption_column", default="text")
    c.add_argument("--max_samples", type=int, default=None)
    c.add_argument("--resolution", type=int, default=512)
    c.add_argument("--num_inference_steps", type=int, default=25)
    c.add_argument("--guidance_scale", type=float, default=7.5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no_baseline", action="store_true", help="skip the control-off reference run")
    c.add_argument("--output_dir", default="control-eval")
    c.set_defaults(func=run_control)


def load_control_pipeline(args):
    """The controllable pipeline of the base model with the `train control` output loaded (GPU if any)."""
    import torch

    from ..model_paths import resolve_model_path
    from ..pipelines.stable_diffusion_control import OrthoStableDiffusionControlPipeline

    pipe = OrthoStableDiffusionControlPipeline.from_pretrained(
        resolve_model_path(args.pretrained_model_name_or_path), safety_checker=None, requires_safety_checker=False
    )
    pipe.load_control(args.control)
    if torch.cuda.is_available():
        pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_control(args) -> int:

    from ..conditions import canny
    from ..evaluation.control_fidelity import evaluate_control, format_table, write_report
    from ..training.control_data import _open, records_from_folder

    if args.resolution % 8:
        raise ValueError(f"--resolution must be divisible by 8, got {args.resolution}")
    if args.toyworld == (args.data_dir is not None):
        raise ValueError("give --data_dir (a folder of examples) or --toyworld, one of them")
    if args.toyworld:
        return run_toyworld(args)
    records = records_from_folder(
        args.data_dir,
        args.image_column,
        args.conditioning_image_column,
        args.caption_column,
        need_condition=args.condition == "none",
    )
    n = len(records) if args.max_samples is None else min(args.max_samples, len(records))
    examples = []
    for i in range(n):
        rec = records[i]
        if args.condition == "canny":
            cond = canny(_open(rec["image"]).resize((args.resolution, args.resolution)))
        else:
            cond = _open(rec["conditioning_image"])
        examples.append((cond, rec["text"]))
    pipe = load_control_pipeline(args)
    result = evaluate_control(
        pipe,
        examples,
        args.num_inference_steps,
        args.guidance_scale,
        args.seed,
        args.resolution,
        baseline=not args.no_baseline,
    )
    paths = write_report(result, args.output_dir)
    print(format_table(result["summary"], result["n"]))
    print(f"\ntable: {paths['table']}\ngrid:  {paths['grid']}\njson:  {paths['json']}")
    return 0


def run_toyworld(args) -> int:
    import json
    from pathlib import Path

    from ..images import image_grid, save_grid
    from ..toyworld.evaluate import CONTROL_SCALES, evaluate_control_task, format_control_table

    pipe = load_control_pipeline(args)
    result = evaluate_control_task(
        pipe, steps=args.num_inference_steps, guidance=args.guidance_scale, seed=args.seed, scales=CONTROL_SCALES
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_control_table(result["results"])
    header = (
        "toy-world control: 12 held-out outlines (Canny of unseen scenes) and 12 hand-drawn outlines; "
        f"{args.num_inference_steps} steps, guidance {args.guidance_scale}; ceiling = VAE reconstructions"
    )
    (out / "control_eval.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out / "control_eval.json").write_text(json.dumps(result["results"], indent=2), encoding="utf-8")
    rows = result["rows"]  # (condition, output, output's edges) per example: four examples per grid row
    save_grid(image_grid([sum(rows[i : i + 4], []) for i in range(0, len(rows), 4)]), out / "control_eval.png")
    print(header + "\n\n" + table)
    print(f"\ntable: {out / 'control_eval.md'}\ngrid:  {out / 'control_eval.png'}\njson:  {out / 'control_eval.json'}")
    return 0
