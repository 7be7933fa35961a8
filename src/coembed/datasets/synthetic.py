"""A deterministic, captioned picture dataset that needs real text-image binding to solve.

Each picture holds one object (with a size, a position and a texture), two or three copies of one
object, or two different objects in a spatial relation ("a red circle left of a blue square").
Captions are phrased through several templates and synonyms, so no single attribute (colour,
shape, position ...) is enough to retrieve the right picture, and the relation pictures can only
be told apart by binding each colour to its shape and the pair to its order.

Everything is pure PIL + numpy and seeded per picture: picture ``i`` of a split depends only on
``(seed, split, i)``, so the same call always writes byte-identical files.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from coembed.files import atomic_write

# Saturated object colours, far apart in hue; backgrounds are kept desaturated so the colour
# word is never ambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 200, 210),
    "blue": (35, 65, 215),
    "purple": (140, 50, 190),
    "pink": (250, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
TEXTURES = ("solid", "striped", "dotted")
COUNTS = {2: ("two", "2", "a pair of"), 3: ("three", "3")}
RELATIONS = ("left of", "right of", "above", "below")

# Synonyms, so the text tower must learn that "disc" and "circle" are the same thing.
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "cross": ("cross", "plus sign"),
}
PLURALS = {
    "circle": "circles",
    "disc": "discs",
    "square": "squares",
    "box": "boxes",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "rhombus": "rhombuses",
    "hexagon": "hexagons",
    "cross": "crosses",
    "plus sign": "plus signs",
}
COLOUR_WORDS = {name: (name,) for name in COLOURS} | {
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
TEXTURE_ADJ = {
    "solid": ("", "", "solid", "plain"),
    "striped": ("striped", "stripy"),
    "dotted": ("dotted", "spotted", "polka-dot"),
}
TEXTURE_WITH = {"solid": ("",), "striped": ("with stripes",), "dotted": ("with dots", "with spots")}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "in the left half"),
    "right": ("on the right", "at the right", "in the right half"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
# Object centre as a fraction of the canvas, jittered a little per picture.
POSITION_XY = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
SIZE_RADIUS = {"small": (0.11, 0.14), "large": (0.19, 0.23)}  # fraction of the canvas
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges, crisp stripes and dots


@dataclass(frozen=True)
class Thing:
    """One drawn object: what it is and where (centre and radius as canvas fractions)."""

    shape: str
    colour: str
    texture: str
    x: float
    y: float
    radius: float


# ---------------------------------------------------------------------------------- drawing


def _regular_polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple]:
    return [
        (
            cx + r * math.cos(phase + 2 * math.pi * k / n),
            cy + r * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _draw_mask(thing: Thing, canvas: int) -> Image.Image:
    """An 'L' mask of the object's silhouette on a canvas x canvas grid."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = thing.x * canvas, thing.y * canvas, thing.radius * canvas
    if thing.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif thing.shape == "square":
        h = r * 0.85  # a square of the same "radius" looks bigger than a circle; shrink it
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif thing.shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + 0.15 * r, 1.1 * r, 3, -math.pi / 2), fill=255)
    elif thing.shape == "star":
        pts = []
        for k in range(10):
            rad = r * (1.05 if k % 2 == 0 else 0.45)
            a = -math.pi / 2 + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        draw.polygon(pts, fill=255)
    elif thing.shape == "diamond":
        draw.polygon(_regular_polygon(cx, cy, 1.05 * r, 4, -math.pi / 2), fill=255)
    elif thing.shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0.0), fill=255)
    elif thing.shape == "cross":
        t = 0.36 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
    else:
        raise ValueError(f"unknown shape {thing.shape!r}")
    return mask


def _texture(thing: Thing, rgb: np.ndarray, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """The object's fill as a (canvas, canvas, 3) uint8 array."""
    fill = np.broadcast_to(rgb, (canvas, canvas, 3)).astype(np.float32)
    if thing.texture == "solid":
        return fill.astype(np.uint8)
    # The second colour: white on dark objects, near-black on light ones, so the pattern shows.
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    other = np.array([250.0, 250.0, 250.0] if luminance < 150 else [30.0, 30.0, 30.0])
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    unit = canvas / 64.0  # pattern sizes are set in pixels of a 64 px picture
    if thing.texture == "striped":
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * math.pi
        period = 4.0 * unit
        u = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        on = (u - np.floor(u)) < 0.5
    elif thing.texture == "dotted":
        spacing, radius = 4.5 * unit, 1.3 * unit
        ox, oy = rng.uniform(0, spacing, size=2)
        dx = (xx + ox) % spacing - spacing / 2
        dy = (yy + oy) % spacing - spacing / 2
        on = dx * dx + dy * dy < radius * radius
    else:
        raise ValueError(f"unknown texture {thing.texture!r}")
    fill[on] = other
    return fill.astype(np.uint8)


def _background(canvas: int, rng: np.random.Generator) -> np.ndarray:
    """A desaturated flat or linear-gradient background, (canvas, canvas, 3) float32."""

    def muted() -> np.ndarray:
        grey = rng.uniform(60, 235)
        return np.clip(grey + rng.uniform(-18, 18, size=3), 0, 255)

    a, b = muted(), muted()
    if rng.random() < 0.3:
        return np.broadcast_to(a, (canvas, canvas, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas
    t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5  # (canvas, canvas)
    t = np.clip(t, 0, 1)[..., None]
    return a * (1 - t) + b * t


def render(things: Sequence[Thing], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the objects (in order, later ones on top) on a random background."""
    canvas = image_size * SUPERSAMPLE
    picture = _background(canvas, rng)
    for thing in things:
        base = np.array(COLOURS[thing.colour], dtype=np.float32)
        rgb = np.clip(base + rng.uniform(-14, 14, size=3), 0, 255)  # colour jitter
        alpha = np.asarray(_draw_mask(thing, canvas), dtype=np.float32)[..., None] / 255.0
        fill = _texture(thing, rgb, canvas, rng).astype(np.float32)
        picture = picture * (1 - alpha) + fill * alpha
    big = Image.fromarray(np.round(picture).astype(np.uint8), "RGB")
    return big.resize((image_size, image_size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------- scenes


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _join(*words: str) -> str:
    return " ".join(w for w in words if w)


def _noun_phrase(
    rng: np.random.Generator, shape: str, colour: str, texture: str, size: str = ""
) -> str:
    """E.g. 'big red striped circle' or 'red disc with dots'."""
    size_word = _pick(rng, SIZE_WORDS[size]) if size else ""
    colour_word = _pick(rng, COLOUR_WORDS[colour])
    shape_word = _pick(rng, SHAPE_WORDS[shape])
    if texture != "solid" and rng.random() < 0.4:
        return _join(size_word, colour_word, shape_word, _pick(rng, TEXTURE_WITH[texture]))
    return _join(size_word, colour_word, _pick(rng, TEXTURE_ADJ[texture]), shape_word)


def _single(rng: np.random.Generator) -> tuple[list[Thing], str]:
    shape, colour = _pick(rng, SHAPES), _pick(rng, list(COLOURS))
    size, position, texture = _pick(rng, SIZES), _pick(rng, POSITIONS), _pick(rng, TEXTURES)
    x, y = (c + rng.uniform(-0.04, 0.04) for c in POSITION_XY[position])
    thing = Thing(shape, colour, texture, x, y, rng.uniform(*SIZE_RADIUS[size]))
    np_ = _noun_phrase(rng, shape, colour, texture, size)
    where = _pick(rng, POSITION_WORDS[position])
    templates: list[Callable[[], str]] = [
        lambda: f"{_article(np_)} {where}",
        lambda: f"a picture of {_article(np_)} {where}",
        lambda: f"{where}, {_article(np_)}",
        lambda: f"there is {_article(np_)} {where}",
        lambda: f"{_article(np_)} placed {where}",
    ]
    return [thing], templates[int(rng.integers(len(templates)))]()


def _spread_centres(rng: np.random.Generator, n: int, radius: float) -> list[tuple[float, float]]:
    """n centres that keep objects apart and inside the canvas (rejection sampling)."""
    lo, hi = radius + 0.03, 1 - radius - 0.03
    while True:
        pts = [tuple(rng.uniform(lo, hi, size=2)) for _ in range(n)]
        if all(math.dist(p, q) > 2.2 * radius for i, p in enumerate(pts) for q in pts[i + 1 :]):
            return pts


def _count(rng: np.random.Generator) -> tuple[list[Thing], str]:
    n = 2 if rng.random() < 0.5 else 3
    shape, colour, texture = _pick(rng, SHAPES), _pick(rng, list(COLOURS)), _pick(rng, TEXTURES)
    radius = rng.uniform(0.10, 0.13)
    things = [
        Thing(shape, colour, texture, x, y, radius) for x, y in _spread_centres(rng, n, radius)
    ]
    colour_word, shape_word = _pick(rng, COLOUR_WORDS[colour]), _pick(rng, SHAPE_WORDS[shape])
    number = _pick(rng, COUNTS[n])
    plural = PLURALS[shape_word]
    if texture != "solid" and rng.random() < 0.4:
        phrase = _join(number, colour_word, plural, _pick(rng, TEXTURE_WITH[texture]))
    else:
        phrase = _join(number, colour_word, _pick(rng, TEXTURE_ADJ[texture]), plural)
    templates = [f"{phrase}", f"a picture of {phrase}", f"there are {phrase}"]
    return things, _pick(rng, templates)


def _pair(rng: np.random.Generator) -> tuple[list[Thing], str]:
    # Two objects that differ in shape or colour (often both), so the caption only matches when
    # each colour is bound to its own shape and the order of the pair is right.
    while True:
        a = (_pick(rng, SHAPES), _pick(rng, list(COLOURS)), _pick(rng, TEXTURES))
        b = (_pick(rng, SHAPES), _pick(rng, list(COLOURS)), _pick(rng, TEXTURES))
        if a[0] != b[0] or a[1] != b[1]:
            break
    relation = _pick(rng, RELATIONS)
    radius = rng.uniform(0.13, 0.17)
    near, far, across = 0.28 + rng.uniform(-0.03, 0.03), 0.72 + rng.uniform(-0.03, 0.03), None
    across = rng.uniform(0.35, 0.65)
    # Place `a` where the relation says relative to `b`.
    if relation == "left of":
        pa, pb = (near, across), (far, across + rng.uniform(-0.1, 0.1))
    elif relation == "right of":
        pa, pb = (far, across), (near, across + rng.uniform(-0.1, 0.1))
    elif relation == "above":
        pa, pb = (across, near), (across + rng.uniform(-0.1, 0.1), far)
    else:
        pa, pb = (across, far), (across + rng.uniform(-0.1, 0.1), near)
    things = [Thing(*a, *pa, radius), Thing(*b, *pb, radius)]
    first = _article(_noun_phrase(rng, *a))
    second = _article(_noun_phrase(rng, *b))
    rel = _pick(rng, RELATION_WORDS[relation])
    templates = [f"{first} {rel} {second}", f"a picture of {first} {rel} {second}"]
    caption = _pick(rng, templates)
    return things, caption


def scene(rng: np.random.Generator) -> tuple[list[Thing], str]:
    """One random scene and its caption: 50% single object, 20% counts, 30% pairs."""
    u = rng.random()
    if u < 0.5:
        return _single(rng)
    if u < 0.7:
        return _count(rng)
    return _pair(rng)


# ---------------------------------------------------------------------------------- writers


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    # One independent stream per picture: picture i does not depend on how many came before.
    return np.random.default_rng(np.random.SeedSequence([seed, split, index]))


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["filepath", "caption"])
            writer.writerows(rows)

    atomic_write(path, write)


def generate(
    output_dir: str | os.PathLike,
    n_train: int = 3000,
    n_val: int = 500,
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, int]:
    """Write ``images/*.png``, ``train.csv`` and ``val.csv`` (filepath, caption) under output_dir.

    Returns the number of pictures written per split. Calling it again with the same arguments
    writes byte-identical files.
    """
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split_id, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        rows = []
        for i in range(n):
            rng = _rng(seed, split_id, i)
            things, caption = scene(rng)
            name = f"images/{split}_{i:05d}.png"
            render(things, image_size, rng).save(out / name, optimize=True)
            rows.append((name, caption))
        _write_csv(out / f"{split}.csv", rows)
    return {"train": n_train, "val": n_val}


SHAPES_SET_COLOURS = ("red", "green", "blue", "yellow")
SHAPES_SET_SHAPES = ("circle", "square", "triangle", "star")


def generate_shapes(
    output_dir: str | os.PathLike,
    n_per_class: int = 16,
    image_size: int = 64,
    seed: int = 0,
    colours: Sequence[str] = SHAPES_SET_COLOURS,
    shapes: Sequence[str] = SHAPES_SET_SHAPES,
) -> list[str]:
    """Write an image-folder classification set: one subfolder per class ("red circle", ...).

    Each picture is one object of the class at a random size, position and texture. Returns
    the class names, sorted (the order an image-folder reader lists them in).
    """
    unknown = [c for c in colours if c not in COLOURS] + [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(
            f"unknown colours/shapes {unknown}; known: {list(COLOURS)}, {list(SHAPES)}"
        )
    out = Path(output_dir)
    classes = []
    for c, colour in enumerate(colours):
        for s, shape in enumerate(shapes):
            name = f"{colour} {shape}"
            classes.append(name)
            (out / name).mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                # Split id 100+ keeps these streams apart from the train/val pictures.
                rng = _rng(seed, 100 + c * len(shapes) + s, i)
                size, texture = _pick(rng, SIZES), _pick(rng, TEXTURES)
                x, y = (v + rng.uniform(-0.04, 0.04) for v in POSITION_XY[_pick(rng, POSITIONS)])
                thing = Thing(shape, colour, texture, x, y, rng.uniform(*SIZE_RADIUS[size]))
                render([thing], image_size, rng).save(out / name / f"{i:03d}.png", optimize=True)
    return sorted(classes)
