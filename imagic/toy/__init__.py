"""The toy world: coloured shapes on plain backgrounds, a text-to-image model trained on them, and an
oracle that reads the attributes back from any image, so edit quality is a number on a CPU."""

from imagic.toy.oracle import Measurement, measure
from imagic.toy.scenes import BACKGROUNDS, COLORS, SHAPES, Scene, caption, parse_caption, random_scene, render

__all__ = [
    "BACKGROUNDS", "COLORS", "SHAPES", "Measurement", "Scene", "caption", "measure", "parse_caption",
    "random_scene", "render",
]
