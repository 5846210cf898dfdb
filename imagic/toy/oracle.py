"""Read a toy scene's attributes back from any image: clean renders, model samples, edit outputs."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from imagic.toy.scenes import BACKGROUNDS, COLORS, RESOLUTION, SHAPES, shape_polygon

FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # shape area / bounding-box area
# Offset from a shape's bounding-box centre to its area centroid, as a fraction of its size.
CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}
MIN_AREA = 4.0  # pixels; less than this is noise, not a shape
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Measurement:
    shape: str | None  # None when no shape was found
    color: str | None
    background: str
    cx: float  # bounding-box centre and size, in pixels of a RESOLUTION-sized image
    cy: float
    size: float
    shape_iou: float  # how well the best shape template fits (1 = perfectly)

    def attributes(self) -> dict[str, str | None]:
        return {"shape": self.shape, "color": self.color, "background": self.background}


def measure(image: Image.Image) -> Measurement:
    """Background from the border, the shape as the largest blob unlike it, its colour, form, centre, size."""
    pixels = np.asarray(image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX), float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)

    # A first, rough foreground gives the shape's colour; then each pixel is split by which of the two
    # colours it is nearer to (projection on the bg→fg line), which halves anti-aliased edges fairly.
    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    rough = _largest_component(distance > 60)
    if rough.sum() < MIN_AREA:
        return Measurement(None, None, background, RESOLUTION / 2, RESOLUTION / 2, 0.0, 0.0)
    core = rough & (distance >= np.percentile(distance[rough], 50))
    fg_rgb = np.median(pixels[core], axis=0)
    color = _nearest(fg_rgb, COLORS)
    axis = fg_rgb - bg_rgb
    weight = ((pixels - bg_rgb) @ axis / (axis @ axis)).clip(0, 1)  # 0 = background, 1 = shape
    mask = _largest_component(weight > 0.5)
    weight = weight * _dilate(mask)  # keep the blob and its soft edge, drop stray pixels elsewhere
    area = weight.sum()
    ys, xs = np.mgrid[0:RESOLUTION, 0:RESOLUTION] + 0.5
    mx, my = (weight * xs).sum() / area, (weight * ys).sum() / area

    best = None
    for shape in SHAPES:
        size = float(np.sqrt(area / FILL_RATIO[shape]))
        cx, cy = mx, my - CENTROID_DY[shape] * size
        template = _soft_mask(shape, cx, cy, size)
        iou = np.minimum(template, weight).sum() / np.maximum(template, weight).sum()
        if best is None or iou > best[0]:
            best = (iou, shape, cx, cy, size)
    iou, shape, cx, cy, size = best
    return Measurement(shape, color, background, float(cx), float(cy), float(size), float(iou))


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: np.linalg.norm(rgb - np.array(palette[name], float)))


def _soft_mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """The shape's pixel coverage (0..1) at RESOLUTION, anti-aliased like the scene renderer."""
    s = _SUPERSAMPLE
    big = Image.new("L", (RESOLUTION * s,) * 2, 0)
    draw = ImageDraw.Draw(big)
    polygon = shape_polygon(shape, cx * s, cy * s, size * s)
    if polygon is None:
        draw.ellipse((s * (cx - size / 2), s * (cy - size / 2), s * (cx + size / 2), s * (cy + size / 2)), fill=255)
    else:
        draw.polygon(polygon, fill=255)
    return np.asarray(big.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX), float) / 255


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of `mask`."""
    labels = np.zeros(mask.shape, int)
    best, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros(mask.shape, bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown
