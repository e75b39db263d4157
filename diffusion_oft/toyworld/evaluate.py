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
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=g,
        height=world.IMAGE_SIZE,
        width=world.IMAGE_SIZE,
    ).images


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
        "subject_striped": subject["is_striped"],
        "subject_star_and_striped": subject["is_subject"],
        "prior_background": prior["background"],
    }
    return {"scores": scores, "rows": rows, "n_subject": len(subject_images), "n_prior": len(prior_images)}


def format_subject_table(results: dict[str, dict]) -> str:
    """Markdown table of judged runs: the scores, and the subject images that are the star / the striped star."""
    lines = [
        "| model | subject fidelity | star | striped star | prompt fidelity | prior preservation |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        s, n = r["scores"], r["n_subject"]
        star, striped_star = round(s["subject_is_star"] * n), round(s["subject_star_and_striped"] * n)
        lines.append(
            f"| {name} | {s['subject_fidelity']:.3f} | {star}/{n} | {striped_star}/{n} | {s['prompt_fidelity']:.3f} "
            f"| {s['prior_preservation']:.3f} |"
        )
    return "\n".join(lines)


def judge_adapter(pipe, output_dir: str | Path, log=print) -> dict:
    """Judge a pipeline whose components carry an adapter, against the same pipeline with the adapter
    switched off (the base model).  Writes judge.json, judge.md and judge.png to output_dir."""
    from ..images import image_grid, save_grid
    from ..inference import set_adapter_enabled

    output_dir = Path(output_dir)
    set_adapter_enabled(pipe, False)
    try:
        base = evaluate_subject(pipe)
    finally:
        set_adapter_enabled(pipe, True)
    adapted = evaluate_subject(pipe)
    results = {"base model": base, "with the adapter": adapted}
    table = format_subject_table(results)
    header = (
        f'toy-world judge: {base["n_subject"]} subject prompts ("{subject_prompt("…")}"), '
        f"{base['n_prior']} in-world prompts; {EVAL_STEPS} steps, guidance {EVAL_GUIDANCE}"
    )
    (output_dir / "judge.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (output_dir / "judge.json").write_text(
        json.dumps({k: v["scores"] for k, v in results.items()}, indent=2), encoding="utf-8"
    )
    rows = adapted["rows"][: len(EVAL_SEEDS)] + adapted["rows"][len(EVAL_SEEDS) :][:1]
    save_grid(image_grid(rows), output_dir / "judge.png")
    log(header)
    log(table)
    return {k: v["scores"] for k, v in results.items()}


# ---- control --------------------------------------------------------------------------------------------
FOLLOW_IOU = 0.5  # box IoU of the generated object with the outline's box that counts as "followed"
CONTROL_SCALES = (0.0, 0.5, 1.0)
HAND_DRAWN_SHAPES = ("square", "circle", "triangle")


def control_eval_examples(n: int = 12, seed: int = 9000) -> list[tuple]:
    """Held-out (condition, caption, scene) triples, never in assets/control."""
    from .datasets import control_scenes

    return [(world.edge_map(s), world.caption(s), s) for s in control_scenes(n, seed)]


def hand_drawn_examples(n: int = 12, seed: int = 7000) -> list[tuple]:
    """(condition, caption, scene): plain 1-px outlines drawn with PIL lines (not Canny output) of a
    square / circle / triangle at a random place and size of the world, white on black."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape = HAND_DRAWN_SHAPES[i % len(HAND_DRAWN_SHAPES)]
        scene = world.sample_scene(rng, shape=shape)
        while not world.edges_visible(scene):
            scene = world.sample_scene(rng, shape=shape)
        img = Image.new("RGB", (world.IMAGE_SIZE, world.IMAGE_SIZE), "black")
        draw = ImageDraw.Draw(img)
        x0, y0, x1, y1 = scene.bbox()
        x1, y1 = x1 - 1, y1 - 1  # PIL's outline includes the end pixel
        if shape == "square":
            draw.rectangle((x0, y0, x1, y1), outline="white")
        elif shape == "circle":
            draw.ellipse((x0, y0, x1, y1), outline="white")
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], outline="white")
        out.append((img, world.caption(scene), scene))
    return out


def _score_control(images, examples) -> dict:
    """Edge F1 / IoU against the condition, box IoU of the judged object against the outline's box,
    and whether the prompt's colour and shape were drawn."""
    from ..conditions import canny_edges, edge_scores
    from .judge import box_iou, read_image

    f1, iou, boxes, colour, shape, both = [], [], [], [], [], []
    for image, (cond, _, scene) in zip(images, examples, strict=True):
        scores = edge_scores(np.asarray(cond.convert("L")) > 127, canny_edges(image))
        f1.append(scores["f1"])
        iou.append(scores["iou"])
        r = read_image(image)
        boxes.append(box_iou(r.box, scene.bbox()))
        colour.append(r.colour == scene.colour)
        shape.append(r.shape == scene.shape)
        both.append(colour[-1] and shape[-1])
    return {
        "edge_f1": mean(f1),
        "edge_iou": mean(iou),
        "box_iou": mean(boxes),
        "followed": mean(b >= FOLLOW_IOU for b in boxes),
        "colour_kept": mean(colour),
        "shape_kept": mean(shape),
        "in_world": mean(both),
        "n": len(images),
        "edge_f1_each": [float(f) for f in f1],  # per image, for intervals
    }


@torch.no_grad()
def control_ceiling(vae, examples) -> dict:
    """What a perfect model reaches through the autoencoder: the scores of the VAE reconstructions of
    the examples' own scenes against their conditions."""
    from PIL import Image

    from ..toyworld.finetune import pixels_of

    images = [world.render(s) for _, _, s in examples]
    latents = vae.encode(pixels_of(images).to(vae.device, vae.dtype)).latent_dist.mean
    decoded = ((vae.decode(latents).sample.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    recon = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in decoded]
    return _score_control(recon, examples)


@torch.no_grad()
def evaluate_control_task(
    pipe,
    *,
    n: int = 12,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    seed: int = 0,
    baseline: bool = False,
    hand_drawn: bool = True,
    scales: tuple[float, ...] = (1.0,),
    ceiling: bool = True,
) -> dict:
    """Control scores on ``n`` held-out world outlines (Canny of unseen scenes) and, with ``hand_drawn``,
    ``n`` plain hand-drawn outlines: at each control scale in ``scales`` (plus 0.0 with ``baseline``),
    edge F1 / IoU, box IoU and the share followed (box IoU >= 0.5), colour and shape kept; the
    ceiling (VAE reconstructions) on the held-out set.  Flat keys ``control_f1`` etc. are the
    held-out set at scale 1."""
    sets = {"held_out": control_eval_examples(n)}
    if hand_drawn:
        sets["hand_drawn"] = hand_drawn_examples(n)
    scales = tuple(sorted(set(scales) | ({0.0} if baseline else set())))
    results, rows = {}, []
    for name, examples in sets.items():
        for scale in scales:
            images = pipe(
                [p for _, p, _ in examples],
                image=[c for c, _, _ in examples],
                control_scale=scale,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=world.IMAGE_SIZE,
                width=world.IMAGE_SIZE,
                generator=torch.Generator().manual_seed(seed),
            ).images
            results[f"{name}@{scale:g}"] = _score_control(images, examples)
            if scale == max(scales):
                from PIL import Image

                from ..conditions import canny_edges

                for (cond, _, _), image in zip(examples, images, strict=True):
                    edges = Image.fromarray((canny_edges(image) * 255).astype(np.uint8)).convert("RGB")
                    rows.append([cond.convert("RGB"), image, edges])
    if ceiling:
        results["ceiling"] = control_ceiling(pipe.vae, sets["held_out"])
    top = results[f"held_out@{max(scales):g}"]
    return {
        "control_f1": top["edge_f1"],
        "control_iou": top["edge_iou"],
        "control_followed": top["followed"],
        "control_box_iou": top["box_iou"],
        "control_off_f1": results.get("held_out@0", {}).get("edge_f1", float("nan")),
        "control_in_world": top["in_world"],
        "control_colour_kept": top["colour_kept"],
        "results": results,
        "rows": rows,
    }


def format_control_table(results: dict) -> str:
    lines = [
        "| set @ control scale | followed (box IoU >= 0.5) | box IoU | edge F1 | edge IoU | colour kept | shape kept |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in results.items():
        lines.append(
            f"| {key} | {r['followed']:.2f} ({round(r['followed'] * r['n'])}/{r['n']}) | {r['box_iou']:.3f} "
            f"| {r['edge_f1']:.3f} | {r['edge_iou']:.3f} | {r['colour_kept']:.2f} | {r['shape_kept']:.2f} |"
        )
    return "\n".join(lines)


def mean(values) -> float:
    return float(np.mean(list(values)))
