"""Manifest entries through the engine into a store — plain functions the Prefect flows wire together.

Per entry: read the input, edit, write images, contact sheet and artifacts, then `record.json` LAST
(create-if-absent): its presence means the attempt is finished. A bad entry gets `error.json` with a
machine-readable reason instead of an exception, so it never sinks the batch.

Resume is by request, not by name (`plan`): an entry is done only when its latest finished record answers
the same request; otherwise it is `changed`, and redone (into a new attempt folder) only when asked.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imagic.config import Redo
from imagic.editor import Editor, ProgressCallback, failure_reason
from imagic.images import ImageError, load_image
from imagic.layout import CLAIMS, ERROR_FILE, RECORD_FILE, SHEET_FILE, attempt_folder, claim_key, scan
from imagic.manifest import Entry, Rejected
from imagic.model_store import model_sha256
from imagic.record import edit_record, failure_record, request, request_changes, sha256
from imagic.result import image_name, png_bytes
from imagic.sheet import contact_sheet
from imagic.settings import Settings
from imagic.storage import Storage, StorageError, read_uri, redact_text, redact_uri


_REDO_ORDER = list(Redo)


@dataclass
class Plan:
    """What a run of a batch does with each valid entry."""

    todo: list[Entry] = field(default_factory=list)  # with the attempt folder each writes
    done: list[tuple[Entry, dict]] = field(default_factory=list)  # (entry, its finished record)
    changed: list[tuple[Entry, dict, list[str]]] = field(default_factory=list)  # (entry, record, what differs)
    failed: list[Entry] = field(default_factory=list)  # failed before and not retried (redo=none)


def plan(entries: list[Entry], store: Storage, *, model: str, model_hash: str | None = None,
         redo: Redo = Redo.failed, check_inputs: bool = True) -> Plan:
    """Sort entries by what the store holds for them (one listing; records and inputs read in parallel).

    `check_inputs` re-reads the input of every finished entry to compare its content hash with the
    record's: an image replaced under the same URI is `changed`, not silently skipped.
    """
    attempts = scan(store.list())
    redo_level = _REDO_ORDER.index(Redo(redo))
    result = Plan()
    finished: list[tuple[Entry, int]] = []
    for entry in entries:
        found = attempts.get(entry.id)
        latest = found.latest if found else 0
        if not found or not latest:
            result.todo.append(entry)
        elif found.state == "finished":
            finished.append((entry, latest))
        elif found.state == "failed" and redo_level < _REDO_ORDER.index(Redo.failed):
            result.failed.append(entry)
        else:  # failed, or started and never finished (a killed worker): try again in the same folder
            result.todo.append(entry.model_copy(update={"attempt": latest}))

    def compare(item: tuple[Entry, int]) -> tuple[Entry, int, dict, list[str]]:
        entry, attempt = item
        record = json.loads(store.read_bytes(f"{attempt_folder(entry.id, attempt)}/{RECORD_FILE}"))
        wanted = request(input_uri=entry.image, target_text=entry.target_text, model=model, model_sha256=model_hash,
                         config=entry.config.model_dump(mode="json"), etas=entry.etas, seeds=entry.seeds,
                         input_sha256=_input_sha256(entry.image) if check_inputs else None)
        return entry, attempt, record, request_changes(record, wanted)

    with ThreadPoolExecutor(max_workers=16) as pool:
        for entry, attempt, record, changes in pool.map(compare, finished):
            redo_this = redo_level >= _REDO_ORDER.index(Redo.all if not changes else Redo.changed)
            if redo_this:
                result.todo.append(entry.model_copy(update={"attempt": attempt + 1}))
            elif changes:
                result.changed.append((entry, record, changes))
            else:
                result.done.append((entry, record))
    return result


def _input_sha256(uri: str) -> str | None:
    """None when the input cannot be read now: it cannot be compared (and a redo would fail the same way)."""
    try:
        return sha256(read_uri(uri))
    except StorageError:
        return None


def chunk(entries: list[Entry], size: int) -> list[list[Entry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


# A claim's lease, renewed while the entry trains: a crashed run holds its entry at most this long.
LEASE_S, RENEW_EVERY_S = 600.0, 60.0


def claim(store: Storage, folder: str, holder: str, lease_s: float = LEASE_S) -> dict | None:
    """Take `folder` for `holder` unless another holder's lease is live; None if taken, else the claim.
    The holder of a live lease may claim again: that renews it.

    Numbered claim files written create-if-absent make this a compare-and-swap: of two runs that race for
    the same number, one wins. A lease expires, so a crashed run never blocks the entry for good.
    """
    number, latest = _latest_claim(store, folder)
    if latest and latest["holder"] != holder and latest["expires_at"] > time.time():
        return None
    mine = {"holder": holder, "expires_at": time.time() + lease_s}
    return mine if store.write_bytes(claim_key(folder, number + 1), _json(mine), if_absent=True) else None


def live_claim(store: Storage, folder: str) -> dict | None:
    """The folder's latest claim, if its lease is live."""
    _, latest = _latest_claim(store, folder)
    return latest if latest and latest["expires_at"] > time.time() else None


def release(store: Storage, folder: str, holder: str) -> None:
    """End `holder`'s lease on `folder` now (an expired claim on top), so a re-run need not wait for it."""
    number, latest = _latest_claim(store, folder)
    if latest and latest["holder"] == holder:
        store.write_bytes(claim_key(folder, number + 1), _json({"holder": holder, "expires_at": 0.0}), if_absent=True)


def _latest_claim(store: Storage, folder: str) -> tuple[int, dict | None]:
    """(number, content) of the folder's latest claim; (0, None) when it has none."""
    keys = sorted(store.list(f"{folder}/{CLAIMS}/"))
    if not keys:
        return 0, None
    return int(keys[-1].rsplit("/", 1)[1].split(".")[0]), json.loads(store.read_bytes(keys[-1]))


def _in_progress(entry: Entry, folder: str, holding: dict) -> dict:
    """The record-shaped row of an entry another run of the batch is editing now."""
    return {"entry_id": entry.id, "manifest_line": entry.line, "status": "in_progress", "attempt": entry.attempt,
            "folder": folder, "input": {"uri": redact_uri(entry.image)}, "target_text": entry.target_text,
            "holder": holding}


def run_entry(editor: Editor, entry: Entry, store: Storage, *, model: str, folder: str | None = None,
              callback: ProgressCallback | None = None, settings: Settings | None = None,
              holder: str | None = None) -> dict:
    """Edit one entry into `<folder>/` of `store` (default: the entry's attempt folder; "" for the store's
    root); returns its record (status succeeded, failed, already_done, or in_progress when another run
    holds the entry). `settings`: the operator's input policy and limits (default: from the environment,
    local mode). `holder`: the batch run this edit belongs to; with it, the entry is claimed first."""
    folder = entry.folder if folder is None else folder
    settings = settings or Settings.from_env()
    if holder is None or not folder:
        return _edit_into(editor, entry, store, folder, model, callback, settings)
    if claim(store, folder, holder) is None:
        return _in_progress(entry, folder, live_claim(store, folder) or {})
    renewed = time.monotonic()

    def renewing(stage: str, step: int, total: int, loss: float) -> None:
        nonlocal renewed
        if time.monotonic() - renewed > RENEW_EVERY_S:
            claim(store, folder, holder)
            renewed = time.monotonic()
        if callback is not None:
            callback(stage, step, total, loss)

    try:
        return _edit_into(editor, entry, store, folder, model, renewing, settings)
    finally:
        release(store, folder, holder)


def _edit_into(editor: Editor, entry: Entry, store: Storage, folder: str, model: str,
               callback: ProgressCallback | None, settings: Settings) -> dict:
    key = (lambda name: f"{folder}/{name}") if folder else (lambda name: name)
    started = time.perf_counter()

    def fail(reason: str, message: str) -> dict:
        record = failure_record(entry_id=entry.id, line=entry.line, input_uri=entry.image,
                                target_text=entry.target_text, reason=reason,
                                message=redact_text(message, entry.image),
                                seconds=time.perf_counter() - started, attempt=entry.attempt)
        store.write_bytes(key(ERROR_FILE), _json(record))
        return record

    if not settings.input_allowed(entry.image):  # the same answer whether such a file exists or not
        return fail("input_not_allowed", f"{redact_uri(entry.image)}: inputs must start with one of "
                                         f"{settings.allowed_inputs} (operator setting IMAGIC_ALLOWED_INPUTS)")
    try:
        input_bytes = read_uri(entry.image, max_bytes=settings.max_input_bytes, timeout_s=settings.input_timeout_s)
        image = load_image(input_bytes, name=redact_uri(entry.image))
        editor.check_inputs(entry.config, entry.etas, entry.seeds)
        result = editor.edit(image, entry.target_text, entry.config, entry.etas, entry.seeds, callback,
                             deadline=time.monotonic() + settings.entry_timeout_s)
    except StorageError as err:
        return fail("input_unreadable", str(err))
    except ImageError as err:
        return fail("input_not_an_image", str(err))
    except ValueError as err:  # e.g. target text longer than the model takes, a CUDA-only option on CPU
        editor.recover()
        return fail("invalid_request", str(err))
    except Exception as err:  # CUDA out of memory, a kernel or model error: this entry fails, the chunk goes on
        editor.recover()
        return fail(*failure_reason(err))

    files = result.to_files()
    files[SHEET_FILE] = png_bytes(
        contact_sheet(result.input_image, result.images, title=entry.target_text, selection=result.selection)
    )
    for name, data in files.items():  # outputs first …
        store.write_bytes(key(name), data)
    record = edit_record(
        result, input_uri=entry.image, input_bytes=input_bytes, model=model,
        model_sha256=model_sha256(editor.pipeline.name_or_path), preset=entry.preset,
        device=str(editor.device), outputs={"contact_sheet": store.url_for(key(SHEET_FILE)),
                                            "artifacts": store.url_for(key("artifacts/"))},
        entry_id=entry.id, attempt=entry.attempt,
    )
    record.update(manifest_line=entry.line, folder=folder, wall_seconds=time.perf_counter() - started)
    for item in record["outputs"]["images"]:
        item["uri"] = store.url_for(key(item["file"]))
    if record["selection"] and record["selection"]["verdict"] == "selected":
        record["selection"]["uri"] = store.url_for(key(record["selection"]["file"]))
    if model in ("toy", "toy-if"):
        record["toy_metrics"] = toy_metrics(entry.target_text, result.images)
    # … the record last, and only once: a concurrent or repeated run never overwrites a finished entry.
    if not store.write_bytes(key(RECORD_FILE), _json(record), if_absent=True):
        record["status"] = "already_done"
    return record


def toy_metrics(target_text: str, images: dict) -> list[dict]:
    """Per (η, seed): what the toy oracle reads, and whether it is what the target text asks for."""
    from imagic.toy import measure, parse_caption

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


def reject(store: Storage, rejected: list[Rejected]) -> list[dict]:
    """Error records for entries that failed validation (they never reach a GPU)."""
    records = []
    for r in rejected:
        record = failure_record(entry_id=r.id, line=r.line, input_uri=r.image, target_text=r.target_text,
                                reason="invalid_entry", message="; ".join(r.problems))
        store.write_bytes(f"{r.id}/{ERROR_FILE}", _json(record))
        records.append(record)
    return records


def read_records(entries: list[Entry], store: Storage, holder: str | None = None) -> list[dict]:
    """Each entry's record (or error record) in its attempt folder: the store, not the workers, is the truth.
    An entry without either that another run (not `holder`) has claimed is `in_progress`."""

    def read(entry: Entry) -> dict:
        for name in (RECORD_FILE, ERROR_FILE):
            try:
                return json.loads(store.read_bytes(f"{entry.folder}/{name}"))
            except StorageError:
                continue
        holding = live_claim(store, entry.folder)
        if holding and holding["holder"] != holder:  # another run of the batch is editing it now
            return _in_progress(entry, entry.folder, holding)
        return failure_record(entry_id=entry.id, line=entry.line, input_uri=entry.image,
                              target_text=entry.target_text, reason="not_run", attempt=entry.attempt,
                              message="no record after the batch (worker lost?); a re-run of the batch redoes it")

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, entries))


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
