"""Judge a pipeline (with or without an adapter) on the toy world's tasks.

- :func:`evaluate_subject`: subject fidelity and prompt fidelity on "a sks toy on a {background}
  background" prompts, and prior preservation (shape and colour right) on the in-world prompts;
- :func:`evaluate_control_task`: Canny edge F1 / IoU of images generated from held-out conditions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import world
from .judge import judge_in_world, judge_subject

SUBJECT_BACKGROUNDS = ("white", "black", "gray", "checkered", "blue", "green")
EVAL_STEPS = 20
EVAL_GUIDANCE = 4.0
EVAL_SEEDS = (0, 1)


def subject_prompt(background: str) -> str:
    return f"a {world.SUBJECT_TOKEN} {world.SUBJECT_CLASS} on a {background} background"


def in_world_prompt(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


@torch.no_grad()
def _generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> list:
    g = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g,
                height=world.IMAGE_SIZE, width=world.IMAGE_SIZE).images


def evaluate_subject(pipe, *, seeds=EVAL_SEEDS, steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE) -> dict:
    """Scores and images (rows: subject prompts per seed, then in-world prompts per seed)."""
    subject_images, backgrounds, prior_images, targets, rows = [], [], [], [], []
    for seed in seeds:
        images = _generate(pipe, [subject_prompt(b) for b in SUBJECT_BACKGROUNDS], seed, steps, guidance)
        subject_images += images
        backgrounds += list(SUBJECT_BACKGROUNDS)
        rows.append(images)
    prior_targets = world.in_world_prompts()
    for seed in seeds:
        images = _generate(pipe, [in_world_prompt(*t) for t in prior_targets], seed, steps, guidance)
        prior_images += images
        targets += prior_targets
        rows.append(images)
    subject = judge_subject(subject_images, backgrounds)
    prior = judge_in_world(prior_images, targets)
    scores = {
        "subject_fidelity": subject["subject_fidelity"],
        "prompt_fidelity": subject["prompt_fidelity"],
        "prior_preservation": prior["in_world"],
        "subject_is_star": subject["is_star"],
        "prior_background": prior["background"],
    }
    return {"scores": scores, "rows": rows, "n_subject": len(subject_images), "n_prior": len(prior_images)}


def format_subject_table(results: dict[str, dict]) -> str:
    lines = ["| model | subject fidelity | prompt fidelity | prior preservation |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        s = r["scores"]
        lines.append(f"| {name} | {s['subject_fidelity']:.3f} | {s['prompt_fidelity']:.3f} | "
                     f"{s['prior_preservation']:.3f} |")
    return "\n".join(lines)


def judge_adapter(pipe, output_dir: str | Path, log=print) -> dict:
    """Judge a pipeline whose components carry an adapter, against the same pipeline with the adapter
    switched off (the base model).  Writes judge.json, judge.md and judge.png to output_dir."""
    from ..inference import set_adapter_enabled
    from ..training.validation import image_grid, save_grid

    output_dir = Path(output_dir)
    set_adapter_enabled(pipe, False)
    try:
        base = evaluate_subject(pipe)
    finally:
        set_adapter_enabled(pipe, True)
    adapted = evaluate_subject(pipe)
    results = {"base model": base, "with the adapter": adapted}
    table = format_subject_table(results)
    header = (f"toy-world judge: {base['n_subject']} subject prompts (\"{subject_prompt('…')}\"), "
              f"{base['n_prior']} in-world prompts; {EVAL_STEPS} steps, guidance {EVAL_GUIDANCE}")
    (output_dir / "judge.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (output_dir / "judge.json").write_text(json.dumps({k: v["scores"] for k, v in results.items()}, indent=2),
                                           encoding="utf-8")
    rows = adapted["rows"][: len(EVAL_SEEDS)] + adapted["rows"][len(EVAL_SEEDS):][:1]
    save_grid(image_grid(rows), output_dir / "judge.png")
    log(header)
    log(table)
    return {k: v["scores"] for k, v in results.items()}


# ---- control --------------------------------------------------------------------------------------------
def control_eval_examples(n: int = 12, seed: int = 9000) -> list[tuple]:
    """Held-out (condition, caption, scene) triples, never in assets/control."""
    from .datasets import control_scenes

    return [(world.edge_map(s), world.caption(s), s) for s in control_scenes(n, seed)]


def evaluate_control_task(pipe, *, n: int = 12, steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE,
                          seed: int = 0, baseline: bool = False) -> dict:
    """Canny F1 / IoU of outputs vs held-out conditions, and whether the requested shape and colour
    are still drawn (the judge's in-world score on the controlled outputs)."""
    from ..evaluation.control_fidelity import evaluate_control

    examples = control_eval_examples(n)
    result = evaluate_control(pipe, [(c, p) for c, p, _ in examples], num_inference_steps=steps,
                              guidance_scale=guidance, seed=seed, resolution=world.IMAGE_SIZE, baseline=baseline)
    outputs = [row[1] for row in result["rows"]]
    judged = judge_in_world(outputs, [(s.shape, s.colour, s.background) for _, _, s in examples])
    summary = result["summary"]
    return {
        "control_f1": summary["controlled"]["f1"],
        "control_iou": summary["controlled"]["iou"],
        "control_off_f1": summary.get("no_control", {}).get("f1", float("nan")),
        "control_in_world": judged["in_world"],
        "rows": result["rows"],
    }


def mean(values) -> float:
    return float(np.mean(list(values)))
