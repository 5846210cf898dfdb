"""What the toy oracle reads in every output of an edit on a toy-world model: a number per image, in its record."""

from __future__ import annotations

from imagic.engine.result import image_name
from imagic.toy.oracle import measure
from imagic.toy.scenes import parse_caption


def toy_metrics(target_text: str, images: dict) -> list[dict]:
    """Per (η, seed): what the toy oracle reads, and whether it is what the target text asks for."""
    try:
        wanted = parse_caption(target_text)
    except ValueError:
        wanted = None
    metrics = []
    for (eta, seed), image in sorted(images.items()):
        m = measure(image)
        metrics.append({"eta": eta, "seed": seed, "file": image_name(eta, seed), **m.attributes(),
                        "cx": round(m.cx, 2), "cy": round(m.cy, 2), "size": round(m.size, 2),
                        "matches_target": None if wanted is None else m.attributes() == wanted})
    return metrics
