"""An entry's outputs in the store, in one place: where its files live (the layout), what they are called,
and the records written beside them — `record.json` for a finished edit, `error.json` for a failed one —
with the request they answer. One schema version for the records and the batch's report.

    <entry id>/                 attempt 1 of an entry: input.png, eta-…_seed-….png, selected.png,
                                contact_sheet.png, artifacts/, record.json (written last: the attempt is
                                finished) or error.json
    <entry id>/.claims/000001.json   who is editing the attempt, until when (a lease: imagic/batch/claims.py)
    <entry id>/.resume.safetensors   the training of a stopped attempt (a preempted GPU), until it finishes
    <entry id>@v2/              attempt 2, made when a changed request is redone: earlier attempts
                                are never overwritten, so nothing a user already has disappears
    line-N@invalid/             error.json of a manifest line that failed validation
    _manifests/<name>-<hash>.jsonl   a manifest staged into the store, so that no pod reads the caller's disk
    _catalogue/<xx>.jsonl       what each finished record answers, with its summary: a re-run reads these
                                256 shards, not every record (imagic/batch/catalogue.py)
    metadata.jsonl              ImageFolder metadata of every finished output (`datasets` reads the folder)
    _batches/<batch id>/        report.json, index.html, edits.parquet of the latest run of a batch
    _batches/<batch id>/runs/<run>/   the same, for every run (earlier reports are kept)
    _batches/<batch id>/chunks/<key>.jsonl   the entries of one chunk run (deployment mode)

The files of the edit itself (images, artifacts/) are named by the engine's `EditResult` (imagic/engine/
result.py), which saves them; this module names everything around them. The *request* (input URI and
content, target text, model and its hash, effective config, η grid, seeds) decides whether a finished
record still answers a manifest entry (`request_changes`).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import PurePosixPath

from imagic.engine.builtins import model_revision
from imagic.engine.result import ARTIFACTS, SELECTED_FILE, EditResult, image_name
from imagic.io.redaction import redact_uri, uri_identity

SCHEMA_VERSION = 2  # of record.json, error.json and report.json
RECORD_FILE, ERROR_FILE, SHEET_FILE = "record.json", "error.json", "contact_sheet.png"
METADATA_FILE = "metadata.jsonl"
DATASET_FILE = "edits.parquet"
REPORT_FILE, INDEX_FILE = "report.json", "index.html"
BATCHES = "_batches"
MANIFESTS = "_manifests"  # manifests staged into the store (content-addressed): what every run of a batch read
CLAIMS = ".claims"
RESUME_FILE = ".resume.safetensors"  # a stopped attempt's training so far (imagic/engine/checkpoints.py)
# Not a character entry ids may hold (imagic/batch/manifest.py), so `a@v2` can never be another entry's id.
ATTEMPT_MARK = "@v"


def attempt_folder(entry_id: str, attempt: int = 1) -> str:
    return entry_id if attempt == 1 else f"{entry_id}{ATTEMPT_MARK}{attempt}"


def parse_folder(folder: str) -> tuple[str, int]:
    """`a@v2` → ("a", 2); `a` → ("a", 1)."""
    entry_id, mark, number = folder.rpartition(ATTEMPT_MARK)
    if mark and number.isdigit() and int(number) >= 2:
        return entry_id, int(number)
    return folder, 1


@dataclass(slots=True)
class Attempts:
    """An entry's attempt folders found in the store: which hold a record, which an error record."""

    finished: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    started: set[int] = field(default_factory=set)

    @property
    def latest(self) -> int:
        return max(self.started | self.finished | self.failed, default=0)

    @property
    def state(self) -> str:
        """Of the latest attempt: `finished` (a record), `failed` (only an error record), or `started`."""
        if self.latest in self.finished:
            return "finished"
        return "failed" if self.latest in self.failed else "started"


def scan(keys: Iterable[str]) -> dict[str, Attempts]:
    """Every entry's attempts, from one listing of the store (not a request per entry)."""
    found: dict[str, Attempts] = defaultdict(Attempts)
    for key in keys:
        folder, slash, name = key.partition("/")
        if not slash or folder.startswith("_"):  # _batches/, _manifests/: no entry id starts with "_"
            continue
        entry_id, attempt = parse_folder(folder)
        attempts = found[entry_id]
        attempts.started.add(attempt)
        if name == RECORD_FILE:
            attempts.finished.add(attempt)
        elif name == ERROR_FILE:
            attempts.failed.add(attempt)
    return dict(found)


def batch_id_for(manifest_uri: str, output_uri: str) -> str:
    """A batch is a manifest written into an output store: re-runs of it share their reports' folder (a re-signed
    manifest URL too: its signature is not part of the name)."""
    return hashlib.sha256(f"{uri_identity(manifest_uri)}|{output_uri}".encode()).hexdigest()[:12]


def batch_key(batch_id: str, name: str, run: str | None = None) -> str:
    """A batch's file: the latest run's (`run=None`), or one run's."""
    return f"{BATCHES}/{batch_id}/{name}" if run is None else f"{BATCHES}/{batch_id}/runs/{run}/{name}"


def staged_manifest_key(name: str, text: str) -> str:
    """`_manifests/<stem>-<content hash>.<suffix>`: a changed manifest never replaces the one a run read."""
    stem, dot, suffix = PurePosixPath(name.split("?")[0]).name.rpartition(".")  # never a URL's query
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{MANIFESTS}/{stem or suffix}-{digest}.{suffix if dot else 'jsonl'}"


def chunk_slice_key(batch_id: str, chunk_key: str) -> str:
    """The entries of one chunk run, written by the parent for the chunk to read (and for an audit after)."""
    return f"{BATCHES}/{batch_id}/chunks/{chunk_key}.jsonl"


def relative_link(from_key: str, to_key: str) -> str:
    """A link from one key's page to another key, that works in a folder and behind S3's HTTP alike."""
    depth = from_key.count("/")
    return "../" * depth + to_key


def claim_key(folder: str, number: int) -> str:
    return f"{folder}/{CLAIMS}/{number:06d}.json"


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


def edit_record(result: EditResult, *, entry_id: str, attempt: int, manifest_line: int | None, folder: str,
                input_uri: str, input_bytes: bytes, model: str, model_sha256: str | None, preset: str, device: str,
                url_for: Callable[[str], str], wall_seconds: float, toy_metrics: list[dict] | None = None,
                input_fingerprint: str | None = None) -> dict:
    """`record.json`: schema-versioned and JSON-ready. `url_for(name)` locates a file of the entry's folder."""
    images = [{"eta": eta, "seed": seed, "file": image_name(eta, seed), **result.scores.get((eta, seed), {}),
               "uri": url_for(image_name(eta, seed))} for eta, seed in sorted(result.images)]
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": "succeeded",
        "entry_id": entry_id,
        "attempt": attempt,
        "created_at": _now(),
        "input": {"uri": redact_uri(input_uri), "sha256": sha256(input_bytes), "size_bytes": len(input_bytes),
                  "fingerprint": input_fingerprint, "transform": result.input_transform},
        "target_text": result.target_text,
        "model": model,
        "model_revision": model_revision(model),
        "model_sha256": model_sha256,
        "preset": preset,
        "stages": result.stages,
        "config": result.config.model_dump(mode="json"),
        "etas": result.etas,
        "seeds": result.seeds,
        "outputs": {"contact_sheet": url_for(SHEET_FILE), "artifacts": url_for(f"{ARTIFACTS}/"), "images": images},
        # Scores (imagic/engine/scores.py) and the automatic choice (imagic/engine/selection.py).
        "reconstruction_fidelity": result.reconstruction_fidelity,
        "selection": _selection(result, url_for),
        "losses": result.losses,
        "seconds": {**result.seconds, "total": sum(result.seconds.values())},
        "peak_memory_bytes": result.peak_memory_bytes,
        "device": device,
        "versions": versions(),
        "manifest_line": manifest_line,
        "folder": folder,
        "wall_seconds": wall_seconds,
    }
    if toy_metrics is not None:
        record["toy_metrics"] = toy_metrics
    return record


def _selection(result: EditResult, url_for: Callable[[str], str]) -> dict | None:
    if result.selection is None:
        return None
    selection = result.selection.to_json()
    if result.selection.verdict == "selected":
        selection["file"] = SELECTED_FILE
        selection["source_file"] = image_name(result.selection.eta, result.selection.seed)
        selection["scores"] = result.scores[(result.selection.eta, result.selection.seed)]
        selection["uri"] = url_for(SELECTED_FILE)
    return selection


def failure_record(*, entry_id: str, line: int | None, input_uri: str | None, target_text: str | None,
                   reason: str, message: str, seconds: float = 0.0, attempt: int = 1) -> dict:
    """`error.json`: a machine-readable reason (`invalid_entry`, `input_unreadable`, …) and a message."""
    return {"schema_version": SCHEMA_VERSION, "status": "failed", "entry_id": entry_id, "attempt": attempt,
            "created_at": _now(), "manifest_line": line,
            "input": {"uri": redact_uri(input_uri) if input_uri else input_uri}, "target_text": target_text,
            "error": {"reason": reason, "message": message}, "wall_seconds": seconds}


def in_progress_record(*, entry_id: str, line: int, attempt: int, folder: str, input_uri: str, target_text: str,
                       holder: dict) -> dict:
    """The record-shaped row of an entry another run of the batch is editing now (never written)."""
    return {"entry_id": entry_id, "manifest_line": line, "status": "in_progress", "attempt": attempt,
            "folder": folder, "input": {"uri": redact_uri(input_uri)}, "target_text": target_text, "holder": holder}


def record_summary(record: dict) -> bytes:
    """What a batch's report and dataset need of a finished record, and no more (no losses, config, versions,
    toy metrics, stage timings), as compact JSON: the plan holds one per finished entry — ≈ 1.1 KB for a
    16 KB record of the toy model's default preset, where the same summary as Python dicts takes ≈ 4.9 KB —
    so that a re-run over 100k of them stays small. `json.loads` gives the record-shaped dict back."""
    outputs = record.get("outputs", {})
    selection = record.get("selection")
    return json.dumps({
        "status": record["status"], "entry_id": record["entry_id"], "attempt": record.get("attempt", 1),
        "run_id": record.get("run_id"),
        "folder": record.get("folder"), "manifest_line": record.get("manifest_line"),
        "target_text": record.get("target_text"), "input": {"uri": record.get("input", {}).get("uri")},
        "wall_seconds": record.get("wall_seconds", 0.0), "device_seconds": record.get("device_seconds"),
        "model": record.get("model"),
        "seconds": {"total": record.get("seconds", {}).get("total", 0.0)}, "device": record.get("device"),
        "created_at": record.get("created_at"), "etas": record.get("etas"), "seeds": record.get("seeds"),
        "outputs": {"contact_sheet": outputs.get("contact_sheet"),
                    "images": [{key: image.get(key) for key in ("eta", "seed", "file", "edit", "fidelity")}
                               for image in outputs.get("images", [])]},
        "selection": selection and {key: selection[key] for key in ("verdict", "eta", "seed", "reason", "uri", "scores")
                                    if key in selection},
    }, separators=(",", ":")).encode()


def request(*, input_uri: str, target_text: str, model: str, config: dict, etas, seeds,
            input_sha256: str | None = None, model_sha256: str | None = None) -> dict:
    """What an entry asks for. Hashes that are unknown (None) are not compared."""
    return {"input_uri": redact_uri(input_uri), "input_sha256": input_sha256, "target_text": target_text, "model": model,
            "model_sha256": model_sha256, "config": config, "etas": [float(e) for e in etas],
            "seeds": [int(s) for s in seeds]}


def request_digest(wanted: dict) -> str:
    """A request as one hash: two requests are the same exactly when their digests are."""
    return sha256(json.dumps(wanted, sort_keys=True, separators=(",", ":")).encode())


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


def json_bytes(data: dict) -> bytes:
    """A record as written: indented JSON, one trailing newline."""
    return (json.dumps(data, indent=2) + "\n").encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
