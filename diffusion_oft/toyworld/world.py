"""The toy world: deterministic 64×64 scenes of one coloured shape on a plain or patterned background.

Every scene is a :class:`Scene` (what is drawn) rendered by :func:`render` (Pillow, drawn at 4× and
downsampled, so edges are anti-aliased) and described by :func:`caption`
("a red circle on a blue background").  :func:`sample_scene` draws scenes from a seeded
``random.Random``, so a dataset is reproducible from its seed.

Pretraining has two stages.  Stage 1 is the base world: circles, squares and triangles in red, green,
blue or yellow.  Stage 2 (:func:`sample_extended_scene`) widens the model's visual vocabulary the way
a large model's is wide: stars, purple and orange, and two-colour stripes
("a red and blue striped square on a white background").

The novel subject of the DreamBooth task — a purple-and-orange striped star — is a combination that
never occurs in either stage: stars are always plain, and the purple-and-orange pair is never striped.
So it is new to the model as a particular dog is new to a model that knows dogs, fur and colours.
Its identifier token ("sks") is in the tokenizer's vocabulary but in no pretraining caption.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

# RGB of every named colour of the world.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
CHECKER_COLOURS = ("white", "gray")  # the two colours of the "checkered" background
CHECKER_CELL = 8  # px at 64×64

OBJECT_COLOURS = ("red", "green", "blue", "yellow")  # stage 1; the in-world prompts of the judge
EXTRA_COLOURS = ("purple", "orange")  # stage 2 adds these (plain, or in stripes)
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "gray", "checkered", "red", "green", "blue", "yellow")

# The DreamBooth subject: a shape and a pattern the pretraining world never shows.
SUBJECT_TOKEN = "sks"
SUBJECT_CLASS = "toy"
SUBJECT_SHAPE = "star"
SUBJECT_COLOURS = ("purple", "orange")  # horizontal stripes
SUBJECT_STRIPE = 6  # px per stripe at 64×64
ALL_SHAPES = SHAPES + (SUBJECT_SHAPE,)


@dataclass(frozen=True)
class Scene:
    """One object on a background.  ``colour`` is a palette name, or "striped" for the subject."""

    shape: str
    colour: str
    background: str
    size: int  # bounding-box side in px (64×64 image)
    cx: int  # bounding-box centre
    cy: int
    stripes: tuple[str, str] | None = None  # colour == "striped": the two colours (None: the subject's)

    def stripe_colours(self) -> tuple[str, str]:
        return self.stripes or SUBJECT_COLOURS

    def bbox(self) -> tuple[int, int, int, int]:
        half = self.size / 2
        return (round(self.cx - half), round(self.cy - half), round(self.cx + half), round(self.cy + half))


def is_subject(scene: Scene) -> bool:
    return (
        scene.shape == SUBJECT_SHAPE
        and scene.colour == "striped"
        and set(scene.stripe_colours()) == set(SUBJECT_COLOURS)
    )


def caption(scene: Scene) -> str:
    if is_subject(scene):
        return f"a {SUBJECT_TOKEN} {SUBJECT_CLASS} on a {scene.background} background"
    if scene.colour == "striped":
        a, b = scene.stripe_colours()
        return f"a {a} and {b} striped {scene.shape} on a {scene.background} background"
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def sample_scene(
    rng: random.Random,
    *,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    size_range: tuple[int, int] = (24, 40),
) -> Scene:
    """A random in-world scene; any of shape / colour / background can be fixed."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(OBJECT_COLOURS)
    if background is None:
        background = rng.choice([b for b in BACKGROUNDS if b != colour])
    if background == colour:
        raise ValueError(f"a {colour} object on a {background} background would be invisible")
    size = rng.randint(*size_range)
    margin = 4 + size // 2
    cx = rng.randint(margin, IMAGE_SIZE - margin)
    cy = rng.randint(margin, IMAGE_SIZE - margin)
    return Scene(shape, colour, background, size, cx, cy)


def sample_extended_scene(rng: random.Random, base_share: float = 0.5) -> Scene:
    """A scene of pretraining stage 2: with probability ``base_share`` a stage-1 scene (so the base world
    stays), else a star or a circle / square / triangle in any of the six colours, plain or (not stars)
    striped in two of them — never the subject's purple-and-orange pair."""
    if rng.random() < base_share:
        return sample_scene(rng)
    colours = OBJECT_COLOURS + EXTRA_COLOURS
    shape = rng.choice(ALL_SHAPES)
    scene = sample_scene(rng, shape=SHAPES[0], colour=OBJECT_COLOURS[0], background="white")
    if shape == SUBJECT_SHAPE or rng.random() < 0.4:
        colour = rng.choice(colours)
        background = rng.choice([b for b in BACKGROUNDS if b != colour])
        return replace(scene, shape=shape, colour=colour, background=background)
    a, b = rng.sample(colours, 2)
    while {a, b} == set(SUBJECT_COLOURS):
        a, b = rng.sample(colours, 2)
    background = rng.choice([x for x in BACKGROUNDS if x not in (a, b)])
    return replace(scene, shape=shape, colour="striped", background=background, stripes=(a, b))


def subject_scene(rng: random.Random, background: str = "white", size_range: tuple[int, int] = (30, 42)) -> Scene:
    """The novel subject (a striped star) at a random size and position."""
    scene = sample_scene(rng, shape=SHAPES[0], colour=OBJECT_COLOURS[0], background="white", size_range=size_range)
    return replace(scene, shape=SUBJECT_SHAPE, colour="striped", background=background)


def star_points(x0: float, y0: float, x1: float, y1: float, inner: float = 0.45) -> list[tuple[float, float]]:
    """A five-pointed star (one point up) filling the box (x0, y0, x1, y1)."""
    angles = [-np.pi / 2 + i * np.pi / 5 for i in range(10)]
    radii = [1.0 if i % 2 == 0 else inner for i in range(10)]
    xs = np.array([r * np.cos(a) for r, a in zip(radii, angles, strict=False)])
    ys = np.array([r * np.sin(a) for r, a in zip(radii, angles, strict=False)])
    xs = (xs - xs.min()) / (xs.max() - xs.min())
    ys = (ys - ys.min()) / (ys.max() - ys.min())
    return [(x0 + x * (x1 - x0), y0 + y * (y1 - y0)) for x, y in zip(xs, ys, strict=False)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(star_points(*box), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; the world has {', '.join(ALL_SHAPES)}")


def shape_mask(shape: str, box: tuple[float, float, float, float], size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` drawn in ``box`` (pixel coordinates of a size×size image)."""
    s = SUPERSAMPLE
    img = Image.new("L", (size * s, size * s), 0)
    draw_shape(ImageDraw.Draw(img), shape, tuple(v * s for v in box), fill=255)
    return np.asarray(img.resize((size, size), Image.BOX)) >= 128


def background_image(background: str, size: int = IMAGE_SIZE) -> Image.Image:
    if background == "checkered":
        a, b = (np.array(PALETTE[c], dtype=np.uint8) for c in CHECKER_COLOURS)
        yy, xx = np.mgrid[0:size, 0:size]
        cell = CHECKER_CELL * size // IMAGE_SIZE
        odd = ((yy // cell + xx // cell) % 2).astype(bool)
        return Image.fromarray(np.where(odd[..., None], b, a))
    if background not in PALETTE:
        raise ValueError(f"unknown background {background!r}; the world has {', '.join(BACKGROUNDS)}")
    return Image.new("RGB", (size, size), PALETTE[background])


def object_fill(scene: Scene, size: int) -> Image.Image:
    """The object's fill as a full-size RGB image (plain colour, or the subject's stripes)."""
    if scene.colour == "striped":
        a, b = (np.array(PALETTE[c], dtype=np.uint8) for c in scene.stripe_colours())
        stripe = SUBJECT_STRIPE * size // IMAGE_SIZE
        rows = (np.arange(size) // stripe % 2).astype(bool)[:, None, None]
        return Image.fromarray(np.broadcast_to(np.where(rows, b, a), (size, size, 3)).copy())
    return Image.new("RGB", (size, size), PALETTE[scene.colour])


def render(scene: Scene) -> Image.Image:
    """The 64×64 RGB image of a scene."""
    s = SUPERSAMPLE
    big = IMAGE_SIZE * s
    img = background_image(scene.background, big)
    mask = Image.new("L", (big, big), 0)
    draw_shape(ImageDraw.Draw(mask), scene.shape, tuple(v * s for v in scene.bbox()), fill=255)
    img.paste(object_fill(scene, big), (0, 0), mask)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def luminance(name: str) -> float:
    r, g, b = PALETTE[name]
    return 0.299 * r + 0.587 * g + 0.114 * b  # what Canny sees (PIL's "L")


def edges_visible(scene: Scene, min_contrast: float = 30.0) -> bool:
    """Whether Canny(100, 200) sees the object's outline: red on green, blue on red, green on gray…
    are colour edges of almost equal luminance, invisible to it (measured: contrast < 26 → no edge)."""
    backgrounds = CHECKER_COLOURS if scene.background == "checkered" else (scene.background,)
    colours = scene.stripe_colours() if scene.colour == "striped" else (scene.colour,)
    return min(abs(luminance(c) - luminance(b)) for c in colours for b in backgrounds) >= min_contrast


def edge_map(scene: Scene) -> Image.Image:
    """The condition of the control task: Canny edges of the rendered scene (white on black)."""
    from ..conditions import canny

    return canny(render(scene))


def generic_image(rng: random.Random) -> Image.Image:
    """A random image for the autoencoder only: 1–3 polygons (3–8 vertices), ellipses or rectangles in
    random colours, plain or striped (any direction, period 3–12 px), on a random plain background.

    The VAE is a general image codec (as Stable Diffusion's is), not a model of the world: trained on
    world scenes alone it cannot encode colours and patterns it never saw (the subject's purple and
    orange stripes came back green).  No caption, no star: the text-to-image model never sees these."""
    s = SUPERSAMPLE
    size = IMAGE_SIZE * s

    def colour():
        return tuple(rng.randint(0, 255) for _ in range(3))

    plain = rng.random() < 0.5
    img = Image.new("RGB", (size, size), colour() if plain else PALETTE[rng.choice(["white", "black", "gray"])])
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.randint(1, 3)):
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy, r = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(0.1, 0.3) * size
        kind = rng.choice(["polygon", "ellipse", "rectangle"])
        if kind == "polygon":
            angles = sorted(rng.uniform(0, 2 * np.pi) for _ in range(rng.randint(3, 8)))
            draw.polygon(
                [(cx + r * rng.uniform(0.7, 1) * np.cos(a), cy + r * rng.uniform(0.7, 1) * np.sin(a)) for a in angles],
                fill=255,
            )
        elif kind == "ellipse":
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r * rng.uniform(0.5, 1)], fill=255)
        else:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r], fill=255)
        a, b = np.array(colour(), np.uint8), np.array(colour(), np.uint8)
        if rng.random() < 0.6:
            period = rng.randint(3, 12) * s
            coordinate = (yy, xx, yy + xx, yy - xx)[rng.randint(0, 3)]
            fill = np.where(((coordinate // period) % 2).astype(bool)[..., None], a, b)
        else:
            fill = np.broadcast_to(a, (size, size, 3))
        img.paste(Image.fromarray(np.ascontiguousarray(fill)), (0, 0), mask)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def sample_codec_scene(rng: random.Random) -> Scene:
    """A scene for the autoencoder's decoder stage only (never captioned, never seen by the UNet): any
    shape of the world, stars included, striped in two palette colours — never the subject's
    purple-and-orange pair — on any background but those two colours."""
    colours = OBJECT_COLOURS + EXTRA_COLOURS + ("white", "black", "gray")
    a, b = rng.sample(colours, 2)
    while {a, b} == set(SUBJECT_COLOURS):
        a, b = rng.sample(colours, 2)
    scene = sample_scene(rng, shape=SHAPES[0], colour=OBJECT_COLOURS[0], background="white", size_range=(24, 44))
    background = rng.choice([x for x in BACKGROUNDS if x not in (a, b)])
    return replace(scene, shape=rng.choice(ALL_SHAPES), colour="striped", background=background, stripes=(a, b))


def extended_prompts() -> list[tuple[str, str, str]]:
    """(shape, colour, background) of stage 2's plain vocabulary for the pretraining report: a star in
    each of the six colours, and circle / square / triangle in purple and orange."""
    out = []
    for i, colour in enumerate(OBJECT_COLOURS + EXTRA_COLOURS):
        out.append((SUBJECT_SHAPE, colour, [b for b in BACKGROUNDS if b != colour][(3 * i) % 7]))
    for i, (shape, colour) in enumerate((s, c) for s in SHAPES for c in EXTRA_COLOURS):
        out.append((shape, colour, ("white", "black", "gray", "checkered", "blue", "green")[i]))
    return out


def in_world_prompts() -> list[tuple[str, str, str]]:
    """A fixed, balanced set of (shape, colour, background) for judging in-world generation:
    every shape × colour once, on backgrounds cycling through the world's backgrounds."""
    out = []
    i = 0
    for shape in SHAPES:
        for colour in OBJECT_COLOURS:
            backgrounds = [b for b in BACKGROUNDS if b != colour]
            out.append((shape, colour, backgrounds[i % len(backgrounds)]))
            i += 1
    return out
