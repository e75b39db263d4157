"""Quality benchmark in the toy world: every method (and PEFT LoRA) at the same step budget, each at
three learning rates spanning 10×, on the subject (DreamBooth) task and the control task.

    python benchmarks/quality.py            # full: 5 adapters × 3 LRs × 2 tasks (control: 600 steps each)
    python benchmarks/quality.py --quick    # middle LR only, fewer steps (~5 min)

Prints a table (trainable params, subject fidelity, prompt fidelity, prior preservation, control
fidelity, wall time; the base model first) and writes benchmarks/results/quality.md, quality.json
and a sample grid PNG per method (rows: each LR's subject images, then its in-world images, then
its control outputs).  Scores are the toy-world judge's (diffusion_oft/toyworld/judge.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def adapter_specs(names: list[str]):
    from diffusion_oft.config import AdapterConfig
    from diffusion_oft.toyworld.finetune import AdapterSpec

    specs = {
        "oft": AdapterSpec("OFT b=32", AdapterConfig(method="oft", block_size=32)),
        "boft": AdapterSpec("BOFT b=8 m=2", AdapterConfig(method="boft", block_size=8, n_butterfly_factors=2)),
        "ether": AdapterSpec("ETHER n=4", AdapterConfig(method="ether", num_blocks=4)),
        "ether_plus": AdapterSpec("ETHER+ n=4", AdapterConfig(method="ether_plus", num_blocks=4)),
        "lora": AdapterSpec("LoRA r=4 (PEFT)", lora_rank=4),
    }
    return [(n, specs[n]) for n in names]


# Middle learning rate per adapter (the grid is ×0.3, ×1, ×3 of it): the papers' SD 1.5 DreamBooth rates
# scaled alike for the 150-step budget (OFT 6e-5, ETHER 6e-3 → ×~20 / ×0.5); LoRA at OFT's.
BASE_LR = {"oft": 1e-3, "boft": 1e-3, "ether": 3e-3, "ether_plus": 1e-3, "lora": 1e-3}
LR_FACTORS = (0.3, 1.0, 3.0)


def subject_data(pipe):
    """The subject's photos with their captions (``<name>.txt``, else the instance prompt)."""
    from PIL import Image

    from diffusion_oft.toyworld.datasets import SUBJECT_PROMPT
    from diffusion_oft.toyworld.finetune import encode, pixels_of
    from diffusion_oft.training.data import sidecar_caption

    paths = sorted((ROOT / "assets" / "subject").glob("*.png"))
    captions = [sidecar_caption(p) or SUBJECT_PROMPT for p in paths]
    return encode(pipe, pixels_of([Image.open(p) for p in paths]), captions)


def control_data(pipe):
    from PIL import Image

    from diffusion_oft.toyworld.finetune import encode, pixels_of

    folder = ROOT / "assets" / "control"
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    latents, text = encode(pipe, pixels_of([Image.open(folder / r["image"]) for r in rows]), [r["text"] for r in rows])
    conds = (pixels_of([Image.open(folder / r["conditioning_image"]) for r in rows]) + 1) / 2  # [0, 1]
    return latents, text, conds


def run_subject(model, spec, lr, steps, seed):
    from diffusion_oft.toyworld.evaluate import evaluate_subject
    from diffusion_oft.toyworld.finetune import load_toy_pipeline, train

    pipe = load_toy_pipeline(model)
    latents, text = subject_data(pipe)
    info = train(pipe, spec, latents, text, steps=steps, lr=lr, seed=seed)
    result = evaluate_subject(pipe)
    return info, result


def run_control(model, spec, lr, steps, seed):
    from diffusion_oft.control import condition_encoder_for
    from diffusion_oft.toyworld.evaluate import evaluate_control_task
    from diffusion_oft.toyworld.finetune import load_toy_pipeline, train

    pipe = load_toy_pipeline(model, control=True)
    latents, text, conds = control_data(pipe)
    torch.manual_seed(seed)
    encoder = condition_encoder_for(pipe.unet, pipe.vae_scale_factor)
    info = train(pipe, spec, latents, text, steps=steps, lr=lr, seed=seed, conditions=conds, encoder=encoder,
                 batch_size=8)
    return info, evaluate_control_task(pipe)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "assets" / "toy-sd"))
    p.add_argument("--methods", nargs="+", default=["oft", "boft", "ether", "ether_plus", "lora"])
    p.add_argument("--tasks", nargs="+", default=["subject", "control"], choices=["subject", "control"])
    p.add_argument("--subject_steps", type=int, default=150)
    p.add_argument("--control_steps", type=int, default=600,
                   help="control task budget (the multiscale encoder, cubic timesteps, v-space loss; at 150 steps "
                   "nothing is followed yet)")
    p.add_argument("--quick", action="store_true", help="middle LR only, half the steps")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.subject_steps //= 2
        args.control_steps //= 2
    factors = (1.0,) if args.quick else LR_FACTORS
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    from diffusion_oft.toyworld.evaluate import evaluate_control_task, evaluate_subject
    from diffusion_oft.toyworld.finetune import load_toy_pipeline
    from diffusion_oft.toyworld.pretrain import image_grid

    rows, grids = [], {}
    start = time.time()
    base_row = {"method": "base model", "lr": None, "params": 0, "seconds": 0.0}
    pipe = load_toy_pipeline(args.model, control=True)
    if "subject" in args.tasks:
        base_subject = evaluate_subject(pipe)
        base_row.update(base_subject["scores"])
        grids["base"] = [base_subject["rows"][0], base_subject["rows"][len(base_subject["rows"]) // 2]]
    if "control" in args.tasks:
        from diffusion_oft.control import condition_encoder_for

        # a fresh encoder's last conv is zero: the base model ignores the conditions
        pipe.set_condition_encoder(condition_encoder_for(pipe.unet, pipe.vae_scale_factor))
        base_control = evaluate_control_task(pipe)
        base_row.update({k: v for k, v in base_control.items() if k != "rows"})
    rows.append(base_row)
    print(format_row(base_row), flush=True)
    del pipe

    for key, spec in adapter_specs(args.methods):
        grid_rows = []
        for factor in factors:
            lr = BASE_LR[key] * factor
            row = {"method": spec.name, "key": key, "lr": lr, "seconds": 0.0}
            if "subject" in args.tasks:
                info, result = run_subject(args.model, spec, lr, args.subject_steps, args.seed)
                row.update(result["scores"], params=info["params"], seconds=row["seconds"] + info["seconds"],
                           subject_loss=(info["first_loss"], info["last_loss"]))
                grid_rows += [result["rows"][0], result["rows"][len(result["rows"]) // 2]]
            if "control" in args.tasks:
                info, result = run_control(args.model, spec, lr, args.control_steps, args.seed)
                row.update({k: v for k, v in result.items() if k != "rows"}, control_params=info["params"],
                           seconds=row["seconds"] + info["seconds"], control_loss=(info["first_loss"],
                                                                                     info["last_loss"]))
                row.setdefault("params", info["params"])
                grid_rows.append([r[1] for r in result["rows"]][:6] + [r[0] for r in result["rows"]][:6])
            rows.append(row)
            print(format_row(row), flush=True)
            # partial results survive an interrupted run
            (out / "quality_partial.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
        grids[key] = grid_rows
    elapsed = time.time() - start

    for key, grid_rows in grids.items():
        image_grid([im for r in grid_rows for im in r], columns=max(len(r) for r in grid_rows)).save(
            out / f"quality_{key}.png")
    table = format_table(rows)
    header = (f"Toy-world quality benchmark ({'quick' if args.quick else 'full'}): subject task "
              f"{args.subject_steps} steps batch 4 on assets/subject, control task {args.control_steps} steps batch 8 "
              f"on assets/control; judged on 12 subject + 24 in-world prompts (20 DPM-Solver steps, guidance 4) and "
              f"12 held-out conditions.  {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}; total {elapsed / 60:.1f} min.")
    print("\n" + header + "\n\n" + table)
    name = "quality_quick" if args.quick else "quality"
    (out / f"{name}.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (out / "quality_partial.json").unlink(missing_ok=True)
    return 0


COLUMNS = [("params", "trainable params", "{:,}"), ("subject_fidelity", "subject fidelity", "{:.3f}"),
           ("prompt_fidelity", "prompt fidelity", "{:.3f}"), ("prior_preservation", "prior preservation", "{:.3f}"),
           ("control_f1", "control F1", "{:.3f}"), ("control_followed", "control followed", "{:.2f}"),
           ("control_in_world", "control shape+colour", "{:.3f}"),
           ("seconds", "train s", "{:.0f}")]


def format_row(row: dict) -> str:
    cells = [row["method"], "–" if row.get("lr") is None else f"{row['lr']:.0e}"]
    for key, _, fmt in COLUMNS:
        cells.append(fmt.format(row[key]) if key in row else "–")
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict]) -> str:
    head = "| method | lr | " + " | ".join(c[1] for c in COLUMNS) + " |"
    return "\n".join([head, "| " + " | ".join(["---"] * (len(COLUMNS) + 2)) + " |"] + [format_row(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
