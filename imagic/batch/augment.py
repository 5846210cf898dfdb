"""Dataset augmentation: every image under a prefix × every target-text template → a manifest.

Entries carry no id, so each gets the manifest's stable id (image stem + hash of the work): a scheduled
run over a growing dataset edits only the images (or templates) it has not seen before.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

from imagic.io.storage import Storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def dataset_images(store: Storage) -> list[str]:
    """URIs of the images under a store's root (by file suffix), sorted."""
    return [store.url_for(key) for key in store.list() if key.lower().endswith(IMAGE_SUFFIXES)]


def check_locations(dataset_uri: str, output_uri: str) -> None:
    """Outputs inside the dataset would be picked up as new inputs by the next scheduled run."""
    dataset, output = (uri.rstrip("/") + "/" for uri in (dataset_uri, output_uri))
    if output.startswith(dataset):
        raise ValueError(f"output {output_uri!r} is inside the dataset {dataset_uri!r}: "
                         "its edits would become next run's inputs")


def augmentation_manifest(images: list[str], templates: list[str], *, etas: list[float] | None = None,
                          seeds: list[int] | None = None, preset: str | None = None,
                          overrides: dict | None = None) -> str:
    """JSONL manifest text. A template may use `{name}`: the image's file name without suffix."""
    if not images:
        raise ValueError("no images to augment (looked for " + ", ".join(IMAGE_SUFFIXES) + ")")
    if not templates:
        raise ValueError("no target-text templates")
    defaults = {k: v for k, v in {"etas": etas, "seeds": seeds, "preset": preset, "overrides": overrides}.items()
                if v is not None}
    lines = [json.dumps({"defaults": defaults})] if defaults else []
    for image in images:
        name = PurePosixPath(image.split("://")[-1]).stem
        for template in templates:
            lines.append(json.dumps({"image": image, "target_text": template.format(name=name)}))
    return "\n".join(lines) + "\n"
