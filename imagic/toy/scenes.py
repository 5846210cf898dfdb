"""Scenes: one shape of one colour on a plain background, at a continuous position and size."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZE_RANGE = (10.0, 18.0)  # shape extent in pixels at RESOLUTION
SUPERSAMPLE = 4  # draw large and downsample: anti-aliased edges, sub-pixel positions


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    cx: float  # centre, pixels from the left
    cy: float  # centre, pixels from the top
    size: float  # width = height of the shape's bounding box, pixels

    def with_(self, **changes) -> Scene:
        return Scene(**{**asdict(self), **changes})


def caption(scene: Scene) -> str:
    return f"a {scene.color} {scene.shape} on {scene.background} background"


_CAPTION = re.compile(r"^a (?P<color>\w+) (?P<shape>\w+) on (?P<background>\w+) background$")


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption (or target text) names: {'color', 'shape', 'background'}."""
    match = _CAPTION.match(text.strip().lower())
    if not match:
        raise ValueError(f"not a toy caption: {text!r} (expected 'a <colour> <shape> on <background> background')")
    found = match.groupdict()
    for key, allowed in (("color", COLORS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        if found[key] not in allowed:
            raise ValueError(f"unknown {key} {found[key]!r} in {text!r}")
    return found


def random_scene(rng: np.random.Generator, **fixed) -> Scene:
    """A scene with every attribute not in `fixed` drawn from `rng`; the shape always fits in the frame."""
    size = fixed.get("size", rng.uniform(*SIZE_RANGE))
    margin = size / 2 + 1
    values = dict(
        shape=str(rng.choice(SHAPES)),
        color=str(rng.choice(list(COLORS))),
        background=str(rng.choice(list(BACKGROUNDS))),
        cx=rng.uniform(margin, RESOLUTION - margin),
        cy=rng.uniform(margin, RESOLUTION - margin),
        size=size,
    )
    return Scene(**{**values, **fixed})


def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Vertices of a square or upward triangle (None for a circle), in the same units as cx, cy, size."""
    h = size / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    polygon = shape_polygon(shape, cx, cy, size)
    if polygon is None:
        draw.ellipse((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def render(scene: Scene, rng: np.random.Generator | None = None, resolution: int = RESOLUTION) -> Image.Image:
    """Draw `scene`. With `rng`, colours jitter a little and mild pixel noise is added (a 'photo')."""
    scale = resolution / RESOLUTION * SUPERSAMPLE
    background, color = np.array(BACKGROUNDS[scene.background], float), np.array(COLORS[scene.color], float)
    if rng is not None:
        background = background + rng.uniform(-10, 10, 3)
        color = color + rng.uniform(-15, 15, 3)
    big = Image.new("RGB", (resolution * SUPERSAMPLE,) * 2, tuple(int(c) for c in background.clip(0, 255)))
    draw_shape(ImageDraw.Draw(big), scene.shape, scene.cx * scale, scene.cy * scale, scene.size * scale,
               tuple(int(c) for c in color.clip(0, 255)))
    image = big.resize((resolution, resolution), Image.Resampling.BOX)
    if rng is None:
        return image
    noisy = np.asarray(image, float) + rng.normal(0, 4.0, (resolution, resolution, 3))
    return Image.fromarray(noisy.round().clip(0, 255).astype(np.uint8))
