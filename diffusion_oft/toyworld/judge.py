"""The programmatic judge of the toy world: reads a generated image back into (background, object
colour, shape) and scores it against what was asked.  The world is ours, so the ground truth is exact.

Reading an image (:func:`read_image`):
1. background — the outer 3-pixel ring's pixels are snapped to the nearest palette colour; a
   colour holding ≥ 60 % of the ring is a plain background, white + gray each ≥ 20 % is "checkered";
2. object — pixels farther than a threshold from every background colour; the largest 4-connected
   component of them;
3. colour — the majority nearest-palette colour of the object's pixels;
4. shape — each shape of the world is drawn into the object's bounding box, and the one with the
   highest IoU against the object mask wins (so position and size do not matter).

Scores (each in [0, 1], means over images):
- ``in_world``: shape and colour both right (the pretrained model's acceptance figure; after
  finetuning it is **prior preservation**);
- ``prompt_fidelity``: the requested background is there (for subject prompts: the subject was
  recontextualised onto the asked background — the analogue of CLIP-T);
- ``subject_fidelity``: ½·IoU of the object with the star drawn in its box + ½·share of the object's
  pixels nearest to the subject's colours or their blend (the analogue of DINO / CLIP-I similarity);
- control fidelity is the Canny edge F1 / IoU of :mod:`diffusion_oft.conditions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .world import (
    ALL_SHAPES,
    BACKGROUNDS,
    CHECKER_COLOURS,
    IMAGE_SIZE,
    OBJECT_COLOURS,
    PALETTE,
    SUBJECT_COLOURS,
    SUBJECT_SHAPE,
    shape_mask,
)

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)  # (colours, 3)
BACKGROUND_DISTANCE = 60.0  # RGB distance under which a pixel counts as background
MIN_OBJECT_AREA = 16  # px at 64×64


@dataclass
class Reading:
    background: str | None
    colour: str | None
    shape: str | None
    area: int
    shape_iou: dict[str, float] = field(default_factory=dict)
    colour_fractions: dict[str, float] = field(default_factory=dict)
    subject_share: float = 0.0
    box: tuple[float, float, float, float] | None = None  # the object's bounding box (x0, y0, x1, y1), px


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        image = np.asarray(image)
    return np.asarray(image, dtype=np.float32)


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into PALETTE's names of the nearest colour, per pixel; pixels (..., 3)."""
    d = ((pixels[..., None, :] - _RGB) ** 2).sum(-1)
    return d.argmin(-1)


def read_background(rgb: np.ndarray) -> tuple[str | None, list[str]]:
    """(background name or None, the palette colours it is made of)."""
    ring = np.concatenate(
        [rgb[:3].reshape(-1, 3), rgb[-3:].reshape(-1, 3), rgb[3:-3, :3].reshape(-1, 3), rgb[3:-3, -3:].reshape(-1, 3)]
    )
    counts = np.bincount(nearest_colour(ring), minlength=len(_NAMES)) / len(ring)
    fractions = dict(zip(_NAMES, counts, strict=False))
    a, b = CHECKER_COLOURS
    if fractions[a] >= 0.2 and fractions[b] >= 0.2:
        return "checkered", list(CHECKER_COLOURS)
    best = _NAMES[int(counts.argmax())]
    if counts.max() >= 0.6 and best in BACKGROUNDS:
        return best, [best]
    return None, [best]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill, numpy only)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=False):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else mask & False


def read_image(image: Image.Image | np.ndarray) -> Reading:
    rgb = _as_array(image)
    background, bg_colours = read_background(rgb)
    bg_rgb = np.array([PALETTE[c] for c in bg_colours], dtype=np.float32)
    dist = np.sqrt(((rgb[..., None, :] - bg_rgb) ** 2).sum(-1)).min(-1)
    mask = largest_component(dist > BACKGROUND_DISTANCE)
    area = int(mask.sum())
    if area < MIN_OBJECT_AREA:
        return Reading(background, None, None, area)
    counts = np.bincount(nearest_colour(rgb[mask]), minlength=len(_NAMES)) / area
    fractions = {n: float(c) for n, c in zip(_NAMES, counts, strict=False) if c > 0}
    colour = max(fractions, key=fractions.get)
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    ious = {}
    for shape in ALL_SHAPES:
        template = shape_mask(shape, box, IMAGE_SIZE)
        union = (template | mask).sum()
        ious[shape] = float((template & mask).sum() / union) if union else 0.0
    shape = max(ious, key=ious.get)
    return Reading(background, colour, shape, area, ious, fractions, subject_colour_share(rgb, mask), box)


# The subject's stripes blur into each other at 64 px through the autoencoder: their mean colour counts too.
_SUBJECT_BLEND = np.mean([PALETTE[c] for c in SUBJECT_COLOURS], axis=0).astype(np.float32)
_RGB_WITH_BLEND = np.concatenate([_RGB, _SUBJECT_BLEND[None]])
_SUBJECT_INDICES = [_NAMES.index(c) for c in SUBJECT_COLOURS] + [len(_NAMES)]


def subject_colour_share(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Share of the object's pixels nearer to a subject colour (or their blend) than to any other colour."""
    d = ((rgb[mask][:, None, :] - _RGB_WITH_BLEND) ** 2).sum(-1)
    return float(np.isin(d.argmin(-1), _SUBJECT_INDICES).mean())


def subject_score(reading: Reading) -> float:
    if reading.shape is None:
        return 0.0
    return 0.5 * reading.shape_iou[SUBJECT_SHAPE] + 0.5 * reading.subject_share


def judge_in_world(images, targets) -> dict[str, float]:
    """images: PIL images; targets: (shape, colour, background) per image.
    Returns shape / colour / background accuracy and ``in_world`` (shape and colour both right)."""
    shape_ok, colour_ok, bg_ok, both = [], [], [], []
    for image, (shape, colour, background) in zip(images, targets, strict=True):
        r = read_image(image)
        shape_ok.append(r.shape == shape)
        colour_ok.append(r.colour == colour)
        bg_ok.append(r.background == background)
        both.append(r.shape == shape and r.colour == colour)
    return {
        "in_world": float(np.mean(both)),
        "shape": float(np.mean(shape_ok)),
        "colour": float(np.mean(colour_ok)),
        "background": float(np.mean(bg_ok)),
    }


def judge_subject(images, backgrounds) -> dict[str, float]:
    """images generated from subject prompts ("a sks toy on a {background} background").
    Returns ``subject_fidelity`` (star shape + striped colours) and ``prompt_fidelity`` (background)."""
    readings = [read_image(im) for im in images]
    return {
        "subject_fidelity": float(np.mean([subject_score(r) for r in readings])),
        "prompt_fidelity": float(np.mean([r.background == b for r, b in zip(readings, backgrounds, strict=True)])),
        "is_star": float(np.mean([r.shape == SUBJECT_SHAPE for r in readings])),
        "is_striped": float(np.mean([has_subject_colours(r) for r in readings])),
        "is_subject": float(np.mean([r.shape == SUBJECT_SHAPE and has_subject_colours(r) for r in readings])),
    }


def has_subject_colours(reading: Reading) -> bool:
    """The object's majority palette colour is one of the subject's and ≥ 50 % of its pixels are nearest
    the subject's colours or their blend ("striped colours")."""
    return reading.colour in SUBJECT_COLOURS and reading.subject_share >= 0.5


def is_in_world_colour(name: str | None) -> bool:
    return name in OBJECT_COLOURS


def box_iou(a: tuple[float, float, float, float] | None, b: tuple[float, float, float, float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes; 0 when ``a`` is None (no object found)."""
    if a is None:
        return 0.0
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
