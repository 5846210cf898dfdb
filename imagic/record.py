"""The JSON records written next to an entry's outputs — `record.json` for a finished edit, `error.json`
for a failed one — and the request they answer: what went in, what came out, how long it took.

The *request* (input URI and content, target text, model and its hash, effective config, η grid, seeds)
is what decides whether a finished record still answers a manifest entry (`request_changes`).
"""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from importlib import metadata

from imagic.result import SELECTED_FILE, EditResult, image_name
from imagic.storage import redact_uri

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
    entry_id: str | None = None,
    attempt: int = 1,
) -> dict:
    """A schema-versioned, JSON-ready record. `outputs` maps role → location (e.g. contact_sheet)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "succeeded",
        "entry_id": entry_id,
        "attempt": attempt,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "input": {"uri": redact_uri(input_uri), "sha256": sha256(input_bytes), "size_bytes": len(input_bytes),
                  "transform": result.input_transform},
        "target_text": result.target_text,
        "model": model,
        "model_sha256": model_sha256,
        "preset": preset,
        "stages": result.stages,
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


def failure_record(*, entry_id: str, line: int | None, input_uri: str | None, target_text: str | None,
                   reason: str, message: str, seconds: float = 0.0, attempt: int = 1) -> dict:
    """`error.json`: a machine-readable reason (`invalid_entry`, `input_unreadable`, …) and a message."""
    return {"schema_version": SCHEMA_VERSION, "status": "failed", "entry_id": entry_id, "attempt": attempt,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "manifest_line": line,
            "input": {"uri": redact_uri(input_uri) if input_uri else input_uri}, "target_text": target_text,
            "error": {"reason": reason, "message": message}, "wall_seconds": seconds}


def request(*, input_uri: str, target_text: str, model: str, config: dict, etas, seeds,
            input_sha256: str | None = None, model_sha256: str | None = None) -> dict:
    """What an entry asks for. Hashes that are unknown (None) are not compared."""
    return {"input_uri": redact_uri(input_uri), "input_sha256": input_sha256, "target_text": target_text, "model": model,
            "model_sha256": model_sha256, "config": config, "etas": [float(e) for e in etas],
            "seeds": [int(s) for s in seeds]}


def request_of_record(record: dict) -> dict:
    """The request a finished record answered (read from its fields: records of every version have them)."""
    return request(input_uri=record["input"]["uri"], input_sha256=record["input"].get("sha256"),
                   target_text=record["target_text"], model=record["model"], model_sha256=record.get("model_sha256"),
                   config=record["config"], etas=record["etas"], seeds=record["seeds"])


def request_changes(record: dict, wanted: dict) -> list[str]:
    """What differs between the request a record answered and the one wanted, e.g. `["model", "config.seed"]`.

    Config fields only one side has are not compared: a field added in a later version with a default
    that keeps the old behaviour does not make every earlier record `changed`.
    """
    had = request_of_record(record)
    changes = [key for key in ("input_uri", "target_text", "model", "etas", "seeds") if had[key] != wanted[key]]
    changes += [key for key in ("input_sha256", "model_sha256")
                if had[key] is not None and wanted[key] is not None and had[key] != wanted[key]]
    changes += [f"config.{key}" for key in sorted(had["config"].keys() & wanted["config"].keys())
                if _comparable(had["config"][key]) != _comparable(wanted["config"][key])]
    return changes


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value
