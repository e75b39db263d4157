"""Quality benchmark in the toy world: every method (and PEFT LoRA, and full UNet finetuning) at the same
step budget, each at three learning rates spanning 10x, over several training seeds, with 95 % intervals.

    python benchmarks/quality.py            # full: 6 rows x 3 LRs x 3 training seeds, subject task (~50 min)
    python benchmarks/quality.py --quick    # middle LR, 1 training seed, 2 evaluation seeds
    python benchmarks/quality.py --tasks subject control   # also the control task (first training seed)

Each run is judged on 6 subject prompts and 12 in-world prompts per evaluation seed.  A row's figure is
the mean over its training seeds' images; its interval is a two-level bootstrap (training seeds, then
images within each), and the claims below the table are bootstrapped differences.  Writes
benchmarks/results/quality.md, quality.json and a sample grid PNG per method.  Scores are the toy-world
judge's (diffusion_oft/toyworld/judge.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
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
        "full": AdapterSpec("full UNet finetuning", full=True),
    }
    return [(n, specs[n]) for n in names]


# Middle learning rate per adapter (the grid is ×0.3, ×1, ×3 of it): the papers' SD 1.5 DreamBooth rates
# scaled alike for the 150-step budget (OFT 6e-5, ETHER 6e-3 → ×~20 / ×0.5); LoRA at OFT's.
BASE_LR = {"oft": 1e-3, "boft": 1e-3, "ether": 3e-3, "ether_plus": 1e-3, "lora": 1e-3, "full": 1e-4}
ORTHOGONAL = ("oft", "boft", "ether", "ether_plus")
BOOTSTRAP = 2000
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


def run_subject(model, spec, lr, steps, seed, eval_seeds):
    from diffusion_oft.toyworld.evaluate import evaluate_subject
    from diffusion_oft.toyworld.finetune import load_toy_pipeline, train

    pipe = load_toy_pipeline(model)
    latents, text = subject_data(pipe)
    info = train(pipe, spec, latents, text, steps=steps, lr=lr, seed=seed)
    result = evaluate_subject(pipe, seeds=eval_seeds)
    return info, result


def per_image(result: dict, n_seeds: int) -> dict[str, list[float]]:
    """Per-image values of one judged run: subject score, asked background right, in-world right."""
    from diffusion_oft.toyworld import world
    from diffusion_oft.toyworld.evaluate import SUBJECT_BACKGROUNDS
    from diffusion_oft.toyworld.judge import read_image, subject_score

    subject, background, prior = [], [], []
    for row in result["rows"][:n_seeds]:
        for image, wanted in zip(row, SUBJECT_BACKGROUNDS, strict=True):
            r = read_image(image)
            subject.append(subject_score(r))
            background.append(float(r.background == wanted))
    for row in result["rows"][n_seeds:]:
        for image, (shape, colour, _) in zip(row, world.in_world_prompts(), strict=True):
            r = read_image(image)
            prior.append(float(r.shape == shape and r.colour == colour))
    return {"subject_fidelity": subject, "prompt_fidelity": background, "prior_preservation": prior}


def bootstrap_means(groups: list[list[float]], rng) -> np.ndarray:
    """BOOTSTRAP resampled means of nested data: training seeds drawn with replacement, then images
    within each drawn seed."""
    arrays = [np.asarray(g, dtype=float) for g in groups]
    out = np.empty(BOOTSTRAP)
    for i in range(BOOTSTRAP):
        picks = rng.integers(0, len(arrays), len(arrays)) if len(arrays) > 1 else [0]
        out[i] = np.mean([arrays[j][rng.integers(0, len(arrays[j]), len(arrays[j]))].mean() for j in picks])
    return out


def interval(groups: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of a row's figure over its training seeds' images."""
    draws = bootstrap_means(groups, np.random.default_rng(seed))
    return float(np.mean([np.mean(g) for g in groups])), float(np.quantile(draws, 0.025)), float(
        np.quantile(draws, 0.975))


def difference(a: list[list[float]], b: list[list[float]], seed: int = 0) -> tuple[float, float, float]:
    """(mean a − mean b, 95 % interval) of two independent rows."""
    rng = np.random.default_rng(seed)
    draws = bootstrap_means(a, rng) - bootstrap_means(b, rng)
    d = float(np.mean([np.mean(g) for g in a]) - np.mean([np.mean(g) for g in b]))
    return d, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


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
    p.add_argument("--methods", nargs="+", default=["oft", "boft", "ether", "ether_plus", "lora", "full"])
    p.add_argument("--tasks", nargs="+", default=["subject"], choices=["subject", "control"])
    p.add_argument("--subject_steps", type=int, default=150)
    p.add_argument("--control_steps", type=int, default=600,
                   help="control task budget (the multiscale encoder, cubic timesteps, v-space loss; at 150 steps "
                   "nothing is followed yet); run for the first training seed only")
    p.add_argument("--train_seeds", type=int, default=None, help="training seeds per row (full 3, quick 1)")
    p.add_argument("--eval_seeds", type=int, default=None,
                   help="evaluation seeds per run, each 6 subject + 12 in-world images (full 6, quick 2)")
    p.add_argument("--lr_factors", type=float, nargs="+", default=None, help="default 0.3 1 3 (quick: 1)")
    p.add_argument("--quick", action="store_true", help="middle LR, 1 training seed, 2 evaluation seeds")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default=None, help="output file stem (default quality / quality_quick)")
    p.add_argument("--seed", type=int, default=0, help="first training seed")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_seeds = [args.seed + i for i in range(args.train_seeds or (1 if args.quick else 3))]
    eval_seeds = tuple(range(args.eval_seeds or (2 if args.quick else 6)))
    factors = tuple(args.lr_factors or ((1.0,) if args.quick else LR_FACTORS))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    from diffusion_oft.toyworld.evaluate import evaluate_control_task, evaluate_subject
    from diffusion_oft.toyworld.finetune import load_toy_pipeline
    from diffusion_oft.toyworld.pretrain import image_grid

    rows, grids, samples = [], {}, {}
    start = time.time()
    base_row = {"method": "base model", "key": "base", "lr": None, "params": 0, "seconds": 0.0}
    pipe = load_toy_pipeline(args.model, control=True)
    if "subject" in args.tasks:
        base_subject = evaluate_subject(pipe, seeds=eval_seeds)
        samples["base"] = [per_image(base_subject, len(eval_seeds))]
        base_row.update(summarise(samples["base"]))
        grids["base"] = [base_subject["rows"][0], base_subject["rows"][len(eval_seeds)]]
    if "control" in args.tasks:
        from diffusion_oft.control import condition_encoder_for

        # a fresh encoder's last conv is zero: the base model ignores the conditions
        pipe.set_condition_encoder(condition_encoder_for(pipe.unet, pipe.vae_scale_factor))
        base_control = evaluate_control_task(pipe)
        base_row.update({k: v for k, v in base_control.items() if k not in ("rows", "results")})
    rows.append(base_row)
    print(format_row(base_row), flush=True)
    del pipe

    for key, spec in adapter_specs(args.methods):
        grid_rows = []
        for factor in factors:
            lr = BASE_LR[key] * factor
            row = {"method": spec.name, "key": key, "lr": lr, "seconds": 0.0, "train_seeds": train_seeds}
            if "subject" in args.tasks:
                runs = []
                for seed in train_seeds:
                    info, result = run_subject(args.model, spec, lr, args.subject_steps, seed, eval_seeds)
                    runs.append(per_image(result, len(eval_seeds)))
                    row.update(params=info["params"], seconds=row["seconds"] + info["seconds"])
                    row.setdefault("subject_loss", []).append((info["first_loss"], info["last_loss"]))
                    if seed == train_seeds[0]:
                        grid_rows += [result["rows"][0], result["rows"][len(eval_seeds)]]
                samples[f"{key}@{lr:.0e}"] = runs
                row.update(summarise(runs))
            if "control" in args.tasks:
                info, result = run_control(args.model, spec, lr, args.control_steps, train_seeds[0])
                row.update({k: v for k, v in result.items() if k not in ("rows", "results")},
                           control_params=info["params"], seconds=row["seconds"] + info["seconds"],
                           control_loss=(info["first_loss"], info["last_loss"]))
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
    claims = format_claims(rows, samples) if "subject" in args.tasks else ""
    full = (len(train_seeds), len(eval_seeds), factors) == (3, 6, LR_FACTORS)
    mode = "quick" if args.quick else ("full" if full else "reduced")
    header = (f"Toy-world quality benchmark ({mode}): subject task {args.subject_steps} steps batch 4 on "
              f"assets/subject, {len(train_seeds)} training seed(s) per row, each judged on "
              f"{6 * len(eval_seeds)} subject + {12 * len(eval_seeds)} in-world images ({len(eval_seeds)} "
              f"evaluation seeds, 20 DPM-Solver steps, guidance 4); [95 % interval: two-level bootstrap over "
              f"training seeds and images].  {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}; total {elapsed / 60:.1f} min.")
    print("\n" + header + "\n\n" + table + "\n\n" + claims)
    name = args.name or ("quality_quick" if args.quick else "quality")
    (out / f"{name}.md").write_text(header + "\n\n" + table + "\n\n" + claims + "\n", encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps({"rows": rows, "samples": samples}, indent=1), encoding="utf-8")
    (out / "quality_partial.json").unlink(missing_ok=True)
    return 0


INTERVAL_KEYS = ("subject_fidelity", "prompt_fidelity", "prior_preservation")


def summarise(runs: list[dict[str, list[float]]]) -> dict:
    """A row's mean and 95 % interval of each judged figure over its runs' images."""
    out = {}
    for k in INTERVAL_KEYS:
        mean, lo, hi = interval([r[k] for r in runs])
        out[k], out[k + "_ci"] = mean, (lo, hi)
    return out


def format_claims(rows: list[dict], samples: dict) -> str:
    """The papers' claims as bootstrapped differences (95 % intervals)."""
    best = {}  # per method, its row of highest subject fidelity
    for r in rows:
        if r.get("lr") is None:
            continue
        if r["key"] not in best or r["subject_fidelity"] > best[r["key"]]["subject_fidelity"]:
            best[r["key"]] = r
    lines = []

    def runs(r, k):
        return [s[k] for s in samples[f"{r['key']}@{r['lr']:.0e}"]]

    if "ether_plus" in best and "lora" in best:
        e, lo = best["ether_plus"], best["lora"]
        d_sub = difference(runs(e, "subject_fidelity"), runs(lo, "subject_fidelity"))
        d_pri = difference(runs(e, "prior_preservation"), runs(lo, "prior_preservation"))
        lines.append(f"- ETHER+ ({e['params']:,} parameters, {e['params'] / lo['params']:.2f}x LoRA r=4's "
                     f"{lo['params']:,}) "
                     f"at its best lr {e['lr']:.0e} vs LoRA at {lo['lr']:.0e}: subject fidelity {d_sub[0]:+.3f} "
                     f"[{d_sub[1]:+.3f}, {d_sub[2]:+.3f}], prior preservation {d_pri[0]:+.3f} "
                     f"[{d_pri[1]:+.3f}, {d_pri[2]:+.3f}]")
    for key in ORTHOGONAL + ("lora", "full"):
        mine = [r for r in rows if r.get("key") == key]
        if len(mine) < 2:
            continue
        hi, lo = max(mine, key=lambda r: r["subject_fidelity"]), min(mine, key=lambda r: r["subject_fidelity"])
        d = difference(runs(hi, "subject_fidelity"), runs(lo, "subject_fidelity"))
        lines.append(f"- {hi['method']}: subject fidelity over lr {min(r['lr'] for r in mine):.0e}-"
                     f"{max(r['lr'] for r in mine):.0e} spans {lo['subject_fidelity']:.3f}-"
                     f"{hi['subject_fidelity']:.3f} "
                     f"(best - worst {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}], {d[0] / hi['subject_fidelity']:.0%} "
                     f"of the best)")
    if "full" in best:
        f = best["full"]
        for key in ORTHOGONAL + ("lora",):
            if key in best:
                d = difference(runs(best[key], "subject_fidelity"), runs(f, "subject_fidelity"))
                lines.append(f"- {best[key]['method']} (best lr) - full finetuning (best lr): subject fidelity "
                             f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]")
    return "\n".join(lines)


COLUMNS = [("params", "trainable params", "{:,}"), ("subject_fidelity", "subject fidelity [95 %]", "{:.3f}"),
           ("prompt_fidelity", "prompt fidelity [95 %]", "{:.3f}"),
           ("prior_preservation", "prior preservation [95 %]", "{:.3f}"),
           ("control_f1", "control F1", "{:.3f}"), ("control_followed", "control followed", "{:.2f}"),
           ("control_in_world", "control shape+colour", "{:.3f}"),
           ("seconds", "train s", "{:.0f}")]


def format_row(row: dict) -> str:
    cells = [row["method"], "–" if row.get("lr") is None else f"{row['lr']:.0e}"]
    for key, _, fmt in COLUMNS:
        cell = fmt.format(row[key]) if key in row else "–"
        if key + "_ci" in row:
            cell += " [{:.3f}, {:.3f}]".format(*row[key + "_ci"])
        cells.append(cell)
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict]) -> str:
    head = "| method | lr | " + " | ".join(c[1] for c in COLUMNS) + " |"
    return "\n".join([head, "| " + " | ".join(["---"] * (len(COLUMNS) + 2)) + " |"] + [format_row(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
