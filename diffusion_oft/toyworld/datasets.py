"""The small datasets shipped in assets/: the novel subject (DreamBooth) and control triples."""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import world

SUBJECT_PROMPT = f"a {world.SUBJECT_TOKEN} {world.SUBJECT_CLASS} on a white background"


# Backgrounds of the subject's photos.  The judge also asks for black, checkered and green, which no photo
# shows: the subject has to be recontextualised there, as DreamBooth's "sks dog in the snow".
SUBJECT_PHOTO_BACKGROUNDS = ("white", "gray", "red", "yellow", "blue")


def write_subject_dataset(
    folder: str | Path, seed: int = 1000, backgrounds: tuple[str, ...] = SUBJECT_PHOTO_BACKGROUNDS
) -> list[Path]:
    """Photos of the subject (a purple-and-orange striped star), one per background, at varied sizes and
    places, each with its caption in ``<name>.txt`` ("a sks toy on a red background"; kohya's convention).

    Photos on one background only teach "sks toy on white" as a whole: the judge then finds the star on
    white and not elsewhere (measured: subject fidelity 0.22 with the prior falling to 0.79, against
    0.30 with the prior kept at 1.00 from these five backgrounds, OFT lr 3e-4)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i, background in enumerate(backgrounds):
        scene = world.subject_scene(rng, background=background)
        path = folder / f"sks_{i}.png"
        world.render(scene).save(path)
        path.with_suffix(".txt").write_text(world.caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def control_scenes(n: int, seed: int) -> list[world.Scene]:
    """n scenes whose outline Canny can see (see world.edges_visible)."""
    rng = random.Random(seed)
    scenes: list[world.Scene] = []
    while len(scenes) < n:
        scene = world.sample_scene(rng)
        if world.edges_visible(scene):
            scenes.append(scene)
    return scenes


def write_control_dataset(folder: str | Path, n: int = 120, seed: int = 2000) -> Path:
    """(image, Canny condition, caption) triples as PNGs + metadata.jsonl (image / conditioning_image / text)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "conditions").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(control_scenes(n, seed)):
        image, cond = f"images/{i:03d}.png", f"conditions/{i:03d}.png"
        world.render(scene).save(folder / image)
        world.edge_map(scene).save(folder / cond)
        rows.append({"image": image, "conditioning_image": cond, "text": world.caption(scene)})
    meta = folder / "metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return meta


def write_prior_dataset(folder: str | Path, n: int = 24, seed: int = 3000) -> list[Path]:
    """n in-world scenes with their captions in ``<name>.txt`` (kohya's convention): regularisation
    images for DreamBooth's prior-preservation loss (``--class_data_dir``; no --class_prompt needed).
    Every shape × colour of the world twice, on random backgrounds, sizes and places."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        shape, colour, _ = world.in_world_prompts()[i % len(world.in_world_prompts())]
        scene = world.sample_scene(rng, shape=shape, colour=colour)
        path = folder / f"prior_{i:02d}.png"
        world.render(scene).save(path)
        path.with_suffix(".txt").write_text(world.caption(scene) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
