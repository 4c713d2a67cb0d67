"""Procedural scenes for the embedded miniature benchmark: eight tasks, one per factor.

Every image shows a few identical objects (shape, colour, count, size, fill) in a random
quadrant over a background (tone, stripe pattern, border). Each of the eight tasks labels
one factor; its images hold every other factor at one class of their own (its domain), so
the tasks' images look different, as the real benchmark's datasets do, and a merged
encoder must serve eight kinds of images at once, which is where task vectors interfere.
Nuisances that no task labels (placement, shades, radius, noise) spread each class. A
caption naming every factor pairs each image for contrastive pretraining of the miniature
CLIP. (An earlier "position" task was dropped: the miniature ViT did not learn it within
the build's step budget.)

Everything is a function of the seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from mergelab.io.hub_layout import write_image_split

IMAGE_SIZE = 64
_SCALE = 4  # drawn at 4× and downsampled, so edges are anti-aliased


@dataclass(frozen=True)
class Factor:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


FACTORS = (
    Factor(
        "shape",
        ("circle", "square", "triangle", "cross"),
        ("a picture of a {c}.", "{c} shapes."),
    ),
    Factor(
        "colour",
        ("red", "green", "blue", "yellow", "magenta", "cyan"),
        ("a picture of {c} objects.", "{c} shapes."),
    ),
    Factor("count", ("one", "two", "three", "four"), ("a picture of {c} objects.", "{c} shapes.")),
    Factor("size", ("small", "medium", "large"), ("a picture of {c} objects.", "{c} shapes.")),
    Factor(
        "frame",
        ("no border", "a thin border", "a thick border", "a double border"),
        ("a picture with {c}.", "shapes with {c}."),
    ),
    Factor("fill", ("solid", "outlined", "hollow"), ("a picture of {c} objects.", "{c} shapes.")),
    Factor(
        "background",
        ("black", "white", "gray", "brown"),
        ("a picture on a {c} background.", "shapes on {c}."),
    ),
    Factor(
        "stripes",
        ("plain", "horizontal", "vertical", "diagonal"),
        ("a picture with a {c} striped background.", "{c} stripes behind shapes."),
    ),
)
TASKS = tuple(f.name for f in FACTORS)

# Each task's visual domain: one class of every factor but its own, a look of its own, as
# each of the real benchmark's datasets has (digits, road signs, satellite images). A
# factor another task labels never varies inside a task's images, so fine-tuning on one
# task learns no invariance to another task's label: the task vectors then interfere as
# real ones do, through what they change, not through what they learn to ignore. The
# nuisances of ``render`` give each class its spread. The labelled factor stays visible:
# shapes and fills are told apart on one large object, counts on small ones, and stripes
# contrast with their black background.
# the class each factor takes in a task's images, in FACTORS' order; None: the task's label
_LOOKS = {
    "shape": (None, "red", "one", "large", "no border", "solid", "black", "plain"),
    "colour": ("circle", None, "two", "large", "no border", "solid", "gray", "plain"),
    "count": ("square", "yellow", None, "small", "no border", "solid", "brown", "plain"),
    "size": ("triangle", "cyan", "one", None, "a thin border", "solid", "white", "plain"),
    "frame": ("cross", "magenta", "two", "medium", None, "solid", "black", "plain"),
    "fill": ("circle", "green", "one", "large", "no border", None, "white", "plain"),
    "background": ("square", "blue", "one", "small", "no border", "outlined", None, "plain"),
    "stripes": ("triangle", "yellow", "one", "small", "no border", "solid", "black", None),
}
# task → factor → the class indices its images may take (a factor not named varies)
DOMAINS: dict[str, dict[str, tuple[int, ...]]] = {
    task: {
        factor.name: (factor.classnames.index(name),)
        for factor, name in zip(FACTORS, look, strict=True)
        if name is not None
    }
    for task, look in _LOOKS.items()
}

_RGB = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "brown": (120, 80, 40),
}
# object radius as a fraction of the image side: the largest object fills a quarter of
# its quadrant, so up to four never overlap (one per cell of the quadrant's 2 × 2 grid)
_RADIUS = {"small": 0.0625, "medium": 0.09, "large": 0.118}
_STRIPE_PERIOD = 1 / 8  # of the image side
# nuisances, kept small enough that no two classes of a factor overlap: radius × (1 ± 0.1)
# keeps medium (≤ 0.099) below large (≥ 0.106); shades move each channel by up to 30,
# less than half the smallest gap between two colour classes in some channel
_RADIUS_JITTER = 0.1
_COLOUR_JITTER = 30.0
_BACKGROUND_JITTER = 20.0
_NOISE = (2.0, 10.0)  # the pixel noise's standard deviation, drawn per image


def sample_factors(rng: np.random.Generator, task: str | None = None) -> dict[str, int]:
    """One class index per factor, drawn from a task's domain (any scene if ``task`` is None)."""
    domain = DOMAINS[task] if task is not None else {}
    scene = {}
    for factor in FACTORS:
        allowed = domain.get(factor.name, range(len(factor.classnames)))
        scene[factor.name] = int(allowed[rng.integers(len(allowed))])
    return scene


def _name(factors: dict[str, int], factor: str) -> str:
    spec = next(f for f in FACTORS if f.name == factor)
    return spec.classnames[factors[factor]]


def caption(factors: dict[str, int]) -> str:
    """A sentence naming every factor, for contrastive pretraining."""
    n = _name
    shape = n(factors, "shape")
    if n(factors, "count") != "one":
        shape += "es" if shape.endswith("s") else "s"
    stripes = n(factors, "stripes")
    pattern = "no stripes" if stripes == "plain" else f"{stripes} stripes"
    return (
        f"{n(factors, 'count')} {n(factors, 'size')} {n(factors, 'fill')} "
        f"{n(factors, 'colour')} {shape} on a {n(factors, 'background')} background "
        f"with {pattern} and {n(factors, 'frame')}."
    )


def render(factors: dict[str, int], rng: np.random.Generator):
    """The image of a scene (PIL, RGB, IMAGE_SIZE²), with nuisances no task labels: the
    objects' quadrant and placement, their exact shade and radius, the background's
    shade, and the pixel noise."""
    from PIL import Image, ImageDraw

    size = IMAGE_SIZE * _SCALE
    background = _shade(_RGB[_name(factors, "background")], _BACKGROUND_JITTER, rng)
    pixels = np.broadcast_to(background, (size, size, 3)).copy()
    stripes = _name(factors, "stripes")
    if stripes != "plain":
        ys, xs = np.mgrid[0:size, 0:size]
        coordinate = {"horizontal": ys, "vertical": xs, "diagonal": xs + ys}[stripes]
        band = (coordinate // int(size * _STRIPE_PERIOD / 2)) % 2 == 0
        pixels[band] = 0.6 * pixels[band] + 0.4 * (255 - background)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    scale = rng.uniform(1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER)
    radius = round(_RADIUS[_name(factors, "size")] * scale * size)
    colour = tuple(int(v) for v in _shade(_RGB[_name(factors, "colour")], _COLOUR_JITTER, rng))
    _draw_frame(draw, factors["frame"], size, tuple(int(v) for v in 255 - background))
    top, left = rng.integers(2, size=2)  # the objects' quadrant
    cell = size // 4  # the quadrant's 2 × 2 grid; one object per cell
    cells = rng.permutation(4)[: factors["count"] + 1]
    slack = max(0, cell // 2 - radius)
    for index in cells:
        cy = (2 * top + index // 2) * cell + cell // 2 + int(rng.integers(-slack, slack + 1))
        cx = (2 * left + index % 2) * cell + cell // 2 + int(rng.integers(-slack, slack + 1))
        _draw_object(draw, _name(factors, "shape"), _name(factors, "fill"), cx, cy, radius, colour)
    noise = rng.normal(0, rng.uniform(*_NOISE), (IMAGE_SIZE, IMAGE_SIZE, 3))
    small = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float32)
    return Image.fromarray((small + noise).clip(0, 255).astype(np.uint8))


def _shade(rgb: tuple[int, int, int], jitter: float, rng: np.random.Generator) -> np.ndarray:
    """A colour moved by up to ``jitter`` per channel: a shade of the same class."""
    return (np.array(rgb, dtype=np.float32) + rng.uniform(-jitter, jitter, 3)).clip(0, 255)


def _draw_frame(draw, kind: int, size: int, colour) -> None:
    """No border, a thin or thick one, or two thin lines (``frame`` classes in order)."""
    thin, thick = size // 32, size // 12
    if kind == 1:
        draw.rectangle((0, 0, size - 1, size - 1), outline=colour, width=thin)
    elif kind == 2:
        draw.rectangle((0, 0, size - 1, size - 1), outline=colour, width=thick)
    elif kind == 3:
        for inset in (0, 2 * thin):
            box = (inset, inset, size - 1 - inset, size - 1 - inset)
            draw.rectangle(box, outline=colour, width=thin)


def _draw_object(draw, shape: str, fill: str, cx: int, cy: int, r: int, colour) -> None:
    width = max(2, r // 4)
    solid = colour if fill == "solid" else None
    outline = colour
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=solid, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=solid, outline=outline, width=width)
    elif shape == "triangle":
        points = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        draw.polygon(points, fill=solid, outline=outline, width=width)
    else:  # cross
        arm = r // 3
        for box in ((cx - r, cy - arm, cx + r, cy + arm), (cx - arm, cy - r, cx + arm, cy + r)):
            draw.rectangle(box, fill=solid, outline=outline, width=width)
    if fill == "hollow":  # a dot in the middle tells hollow from outlined
        dot = max(2, r // 4)
        draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=colour)


def write_tasks(root: str | os.PathLike, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """The eight tasks as hub-layout datasets under ``root/data/<task>`` and task YAML files
    under ``root/tasks``; returns task → YAML path. Each task's split draws its own scenes
    from a generator seeded by (seed, task, split)."""
    root = Path(root)
    specs = {}
    for index, factor in enumerate(FACTORS):
        folder = root / "data" / factor.name
        for split_index, (split, count) in enumerate(sizes.items()):
            rng = np.random.default_rng([seed, index, split_index])
            scenes = [sample_factors(rng, factor.name) for _ in range(count)]
            images = [render(scene, rng) for scene in scenes]
            labels = [scene[factor.name] for scene in scenes]
            write_image_split(folder, split, images, labels)
        spec = {
            "name": factor.name,
            "dataset": f"../data/{factor.name}",  # relative: the folder may move
            "classnames": list(factor.classnames),
            "templates": list(factor.templates),
        }
        path = root / "tasks" / f"{factor.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        specs[factor.name] = path
    return specs
