"""Control fidelity for Canny conditions, as in the OFT paper: Canny(100, 200) edges of the generated
image against the input edge map, as IoU and F1, averaged over a set of conditions; with the
condition applied and, as a reference, with the control switched off (the base model's score)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..conditions import canny_edges, edge_scores


def evaluate_control(
    pipe,
    examples: list[tuple],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    resolution: int = 512,
    low: float = 100.0,
    high: float = 200.0,
    baseline: bool = True,
) -> dict:
    """examples: [(condition edge map PIL, prompt)].  Returns per-example and mean scores and the images."""
    rows, results = [], {"controlled": [], "no_control": []}
    for cond, prompt in examples:
        cond = cond.convert("RGB").resize((resolution, resolution))
        reference = np.asarray(cond.convert("L")) > 127
        settings = [("controlled", 1.0)] + ([("no_control", 0.0)] if baseline else [])
        row = [cond]
        for name, scale in settings:
            image = pipe(
                prompt,
                image=cond,
                control_scale=scale,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            edges = canny_edges(image, low, high)
            results[name].append(edge_scores(reference, edges))
            if name == "controlled":
                row += [image, _edge_image(edges)]
        rows.append(row)
    summary = {}
    for name, scores in results.items():
        if scores:
            summary[name] = {k: float(np.mean([s[k] for s in scores])) for k in ("iou", "f1", "precision", "recall")}
    return {"summary": summary, "per_example": results, "rows": rows, "n": len(examples)}


def _edge_image(edges: np.ndarray):
    from PIL import Image

    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def format_table(summary: dict, n: int) -> str:
    lines = [
        f"Canny control fidelity over {n} conditions (Canny(100, 200) of the output vs the input edges)",
        "",
        "| setting | edge IoU | edge F1 | precision | recall |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {"controlled": "with the condition", "no_control": "control off (base model)"}
    for key, s in summary.items():
        lines.append(f"| {names[key]} | {s['iou']:.3f} | {s['f1']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} |")
    return "\n".join(lines)


def write_report(result: dict, output_dir: str | Path) -> dict[str, Path]:
    from ..images import image_grid, save_grid

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(result["summary"], result["n"])
    paths = {"table": out / "control_eval.md", "json": out / "control_eval.json", "grid": out / "control_eval.png"}
    paths["table"].write_text(table + "\n", encoding="utf-8")
    paths["json"].write_text(
        json.dumps({k: result[k] for k in ("summary", "per_example", "n")}, indent=2), encoding="utf-8"
    )
    save_grid(image_grid(result["rows"]), paths["grid"])
    return paths
