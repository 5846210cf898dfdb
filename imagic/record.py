"""The JSON record written next to an edit's outputs: what went in, what came out, how long it took."""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from importlib import metadata

from imagic.result import SELECTED_FILE, EditResult, image_name

SCHEMA_VERSION = 1
_PACKAGES = ("imagic-batch", "torch", "diffusers", "transformers", "peft", "safetensors")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict[str, str]:
    """Versions of the packages that decide what an edit computes."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def edit_record(
    result: EditResult,
    *,
    input_uri: str,
    input_bytes: bytes,
    model: str,
    model_sha256: str | None = None,
    preset: str,
    device: str,
    outputs: dict[str, str],
) -> dict:
    """A schema-versioned, JSON-ready record. `outputs` maps role → location (e.g. contact_sheet)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "succeeded",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {"uri": input_uri, "sha256": sha256(input_bytes), "size_bytes": len(input_bytes)},
        "target_text": result.target_text,
        "model": model,
        "model_sha256": model_sha256,
        "preset": preset,
        "config": result.config.model_dump(mode="json"),
        "etas": result.etas,
        "seeds": result.seeds,
        "outputs": {
            **outputs,
            "images": [
                {"eta": eta, "seed": seed, "file": image_name(eta, seed), **result.scores.get((eta, seed), {})}
                for eta, seed in sorted(result.images)
            ],
        },
        # Scores (imagic/scores.py) and the automatic choice (imagic/selection.py).
        "reconstruction_fidelity": result.reconstruction_fidelity,
        "selection": _selection(result),
        "losses": result.losses,
        "seconds": {**result.seconds, "total": sum(result.seconds.values())},
        "peak_memory_bytes": result.peak_memory_bytes,
        "device": device,
        "versions": versions(),
    }


def _selection(result: EditResult) -> dict | None:
    if result.selection is None:
        return None
    selection = result.selection.to_json()
    if result.selection.verdict == "selected":
        selection["file"] = SELECTED_FILE
        selection["source_file"] = image_name(result.selection.eta, result.selection.seed)
        selection["scores"] = result.scores[(result.selection.eta, result.selection.seed)]
    return selection
