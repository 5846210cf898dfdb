"""One manifest entry through the engine into a store; and what a batch writes or reads for entries as a whole.

Per entry: read the input (bounded), edit, write images, contact sheet and artifacts, then `record.json`
LAST (create-if-absent): its presence means the attempt is finished. A bad entry gets `error.json` with a
machine-readable reason instead of an exception, so it never sinks the batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from imagic.batch.claims import Heartbeat, claim, live_claim, release
from imagic.batch.manifest import Entry, Rejected
from imagic.batch.outputs import (ERROR_FILE, RECORD_FILE, RESUME_FILE, SHEET_FILE, edit_record, failure_record,
                                  in_progress_record, json_bytes, record_summary)
from imagic.batch.settings import Settings
from imagic.batch.sheet import contact_sheet
from imagic.engine.builtins import has_oracle
from imagic.engine.identity import model_sha256
from imagic.engine.images import ImageError, load_image
from imagic.engine.result import png_bytes
from imagic.toy.metrics import toy_metrics
from imagic.io.inputs import read_input
from imagic.io.redaction import redact_text, redact_uri
from imagic.io.storage import Storage, StorageError

if TYPE_CHECKING:
    from imagic.engine.denoiser import ProgressCallback
    from imagic.engine.editor import Editor


def run_entry(editor: Editor, entry: Entry, store: Storage, *, model: str, folder: str | None = None,
              callback: ProgressCallback | None = None, settings: Settings | None = None,
              holder: str | None = None, stop: Callable[[], bool] | None = None,
              overhead_seconds: float = 0.0) -> dict:
    """Edit one entry into `<folder>/` of `store` (default: the entry's attempt folder; "" for the store's
    root); returns its record (status succeeded, failed, already_done, in_progress when another run holds
    the entry, or preempted). `settings`: the operator's input policy and limits (default: the built-in
    ones). `holder`: the batch run this edit belongs to; with it, the entry is claimed first. `stop`: asked at
    every training step; once it says yes, the training so far is saved into the attempt folder and the
    entry is `preempted` (not written: the next try resumes it there). `overhead_seconds`: the entry's share of
    its worker's start, model load and hashing, counted into its `device_seconds` (what it costs)."""
    folder = entry.folder if folder is None else folder
    settings = settings or Settings.defaults()
    if holder is None or not folder:
        return _edit_into(editor, entry, store, folder, model, callback, settings, stop, overhead_seconds)
    try:
        taken = claim(store, folder, holder)
    except StorageError as err:  # this entry's claim cannot be written: this entry fails, the batch goes on
        return failure_record(entry_id=entry.id, line=entry.line, input_uri=entry.image, target_text=entry.target_text,
                              reason="storage_error", attempt=entry.attempt,
                              message=f"could not claim the entry: {redact_text(str(err), entry.image)}")
    if taken is None:
        try:
            holding = live_claim(store, folder) or {}
        except StorageError:
            holding = {}  # who holds it cannot be read now: it is held all the same
        return in_progress_record(entry_id=entry.id, line=entry.line, attempt=entry.attempt, folder=folder,
                                  input_uri=entry.image, target_text=entry.target_text, holder=holding)
    try:
        store.discard_partials(folder)  # writes its earlier holder did not finish: this run holds the folder now
        with Heartbeat(store, folder, holder):  # renewed from a thread, whatever stage the edit is in
            return _edit_into(editor, entry, store, folder, model, callback, settings, stop, overhead_seconds,
                              holder)
    finally:
        try:
            release(store, folder, holder)
        except StorageError:
            pass  # the lease runs out by itself, within LEASE_S


def _edit_into(editor: Editor, entry: Entry, store: Storage, folder: str, model: str,
               callback: ProgressCallback | None, settings: Settings, stop: Callable[[], bool] | None,
               overhead_seconds: float = 0.0, holder: str | None = None) -> dict:
    from imagic.engine.checkpoints import Preempted  # torch: only where an edit runs

    key = (lambda name: f"{folder}/{name}") if folder else (lambda name: name)
    started = time.perf_counter()

    def fail(reason: str, message: str) -> dict:
        record = failure_record(entry_id=entry.id, line=entry.line, input_uri=entry.image,
                                target_text=entry.target_text, reason=reason,
                                message=redact_text(message, entry.image),
                                seconds=time.perf_counter() - started, attempt=entry.attempt)
        try:
            store.write_bytes(key(ERROR_FILE), json_bytes(record))
        except StorageError:
            pass  # the store is failing: the run's report still has this entry's failure, and a re-run retries it
        return record

    if over := settings.budget_problems(entry.config, entry.etas, entry.seeds):  # this worker's own limits
        return fail("over_budget", "; ".join(over))
    if not settings.input_allowed(entry.image):  # the same answer whether such a file exists or not
        return fail("input_not_allowed", f"{redact_uri(entry.image)}: inputs must start with one of "
                                         f"{settings.allowed_inputs} (operator setting "
                                         f"{settings.env_name('allowed_inputs')})")
    try:
        input_bytes, input_fingerprint = read_input(entry.image, max_bytes=settings.max_input_bytes,
                                                    timeout_s=settings.input_timeout_s)
        image = load_image(input_bytes, name=redact_uri(entry.image))
        editor.check_inputs(entry.config, entry.etas, entry.seeds)
        checkpoints = resume_state(store, key(RESUME_FILE), settings, stop) if folder else None
        result = editor.edit(image, entry.target_text, entry.config, entry.etas, entry.seeds, callback,
                             deadline=time.monotonic() + settings.entry_timeout_s, checkpoints=checkpoints)
    except Preempted as err:  # the training so far is in the attempt folder; nothing else was written
        return {"entry_id": entry.id, "status": "preempted", "attempt": entry.attempt, "folder": folder,
                "manifest_line": entry.line, "message": str(err)}
    except StorageError as err:
        return fail("input_unreadable", str(err))
    except ImageError as err:
        return fail("input_not_an_image", str(err))
    except ValueError as err:  # e.g. target text longer than the model takes, a CUDA-only option on CPU
        editor.recover()
        return fail("invalid_request", str(err))
    except Exception as err:  # CUDA out of memory, a kernel or model error: this entry fails, the chunk goes on
        editor.recover()
        return fail(*failure_reason(err, settings))

    try:
        return _write_outputs(result, entry, store, key, folder, model, editor, input_bytes, input_fingerprint,
                              started, overhead_seconds, checkpoints, settings, holder)
    except StorageError as err:  # this entry's outputs cannot be written: it fails, the batch goes on
        return fail("storage_error", f"could not write the outputs: {err}")


def _write_outputs(result, entry: Entry, store: Storage, key, folder: str, model: str, editor: Editor,
                   input_bytes: bytes, input_fingerprint: str | None, started: float, overhead_seconds: float,
                   checkpoints, settings: Settings, holder: str | None) -> dict:
    """Images, contact sheet and artifacts, then `record.json` last (create-if-absent)."""
    files = result.to_files()
    files[SHEET_FILE] = png_bytes(
        contact_sheet(result.input_image, result.images, title=entry.target_text, selection=result.selection)
    )
    for name, data in files.items():  # outputs first …
        store.write_bytes(key(name), data)
    record = edit_record(
        result, entry_id=entry.id, attempt=entry.attempt, manifest_line=entry.line, folder=folder,
        input_uri=entry.image, input_bytes=input_bytes, input_fingerprint=input_fingerprint, model=model,
        model_sha256=model_sha256(editor.pipeline.name_or_path), preset=entry.preset, device=str(editor.device),
        url_for=lambda name: store.url_for(key(name)), wall_seconds=time.perf_counter() - started,
        toy_metrics=toy_metrics(entry.target_text, result.images) if has_oracle(model) else None,
    )
    # What the entry held its device for: its own wall time and its share of the worker's start and model load.
    record["device_seconds"] = record["wall_seconds"] + overhead_seconds
    record["overhead_seconds"] = overhead_seconds
    record["run_id"] = holder  # which run of the batch made it: its report counts only its own
    if checkpoints is not None and checkpoints.resumed:
        record["resumed"] = {"from": checkpoints.resumed, "saved_every_steps": settings.checkpoint_every_steps}
    # … the record last, and only once: a concurrent or repeated run never overwrites a finished entry.
    data = json_bytes(record)
    if not store.write_bytes(key(RECORD_FILE), data, if_absent=True) and store.read_bytes(key(RECORD_FILE)) != data:
        record["status"] = "already_done"  # another run's (a retry that finds its own lost write is not)
    if checkpoints is not None:
        try:
            store.delete(key(RESUME_FILE))  # finished: nothing to resume
        except StorageError:
            pass  # a stale resume file beside a record is never read: a finished attempt is not resumed
    return record


def resume_state(store: Storage, key: str, settings: Settings, stop: Callable[[], bool] | None):
    """The `Checkpoints` of an attempt: saved into `key` as training goes, resumed from what `key` holds (a
    stopped try's training). An unreadable state is started over, not trusted."""
    from imagic.engine.checkpoints import Checkpoints

    options = {"every_steps": settings.checkpoint_every_steps, "should_stop": stop or (lambda: False),
               "save": lambda checkpoints: store.write_bytes(key, checkpoints.to_bytes())}
    try:
        return Checkpoints.from_bytes(store.read_bytes(key), **options)
    except Exception:  # none (a first try), or damaged: started over
        return Checkpoints(**options)


def failure_reason(error: BaseException, settings: Settings) -> tuple[str, str]:
    """(reason, message) for an edit that raised: what went wrong, and what to do about it."""
    import torch

    if isinstance(error, TimeoutError):
        return "time_limit", f"{error} (operator setting {settings.env_name('entry_timeout_s')})"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out_of_memory", (f"the GPU ran out of memory ({str(error).splitlines()[0]}); lower render_batch_size "
                                 "or train_batch_size, or set finetune_method=lora, mixed_precision=bf16, "
                                 "gradient_checkpointing=true")
    return "engine_error", f"{type(error).__name__}: {error}"


def reject(store: Storage, rejected: list[Rejected]) -> list[dict]:
    """Error records for entries that failed validation (they never reach a GPU)."""
    records = []
    for r in rejected:
        record = failure_record(entry_id=r.id, line=r.line, input_uri=r.image, target_text=r.target_text,
                                reason="invalid_entry", message="; ".join(r.problems))
        store.write_bytes(f"{r.id}/{ERROR_FILE}", json_bytes(record))
        records.append(record)
    return records


def read_records(entries: list[Entry], store: Storage, holder: str | None = None) -> list[dict]:
    """Each entry's record (or error record) in its attempt folder, as `read_summaries` reads it."""
    return [json.loads(summary) for summary in read_summaries(entries, store, holder)]


def read_summaries(entries: list[Entry], store: Storage, holder: str | None = None,
                   outcomes: dict[str, dict] | None = None) -> list[bytes]:
    """Each entry's record in its attempt folder, as compact JSON: a finished record's summary
    (`record_summary`: what the report needs, ≈ 1 KB of a 16 KB record), an error record whole. The store, not
    the workers, is the truth. An entry without either that another run (not `holder`) has claimed is
    `in_progress`; one without either that nobody holds is `not_run` — unless this run's `outcomes` (entry
    id → {status, reason, message}, as its chunks returned them) say it failed: a store that failed the
    entry may have refused its error record too. A transient store error is raised (to be retried), never
    taken for a missing record."""

    def read(entry: Entry) -> bytes:
        record = _stored_json(store, f"{entry.folder}/{RECORD_FILE}")
        if record is not None:
            try:
                if holder is not None and record.get("run_id") not in (None, holder):
                    record["status"] = "already_done"  # finished by another run of the batch, not by this one
                return record_summary(record)
            except (ValueError, KeyError, TypeError, AttributeError):
                pass  # unreadable as a record: its error record, if any, says what happened
        error = _stored_json(store, f"{entry.folder}/{ERROR_FILE}")
        if error is not None:
            return _compact(error)
        holding = live_claim(store, entry.folder)
        if holding and holding["holder"] != holder:  # another run of the batch is editing it now
            return _compact(in_progress_record(entry_id=entry.id, line=entry.line, attempt=entry.attempt,
                                               folder=entry.folder, input_uri=entry.image,
                                               target_text=entry.target_text, holder=holding))
        known = (outcomes or {}).get(entry.id) or {}
        if known.get("status") == "failed":
            return _compact(failure_record(entry_id=entry.id, line=entry.line, input_uri=entry.image,
                                           target_text=entry.target_text, reason=known["reason"],
                                           attempt=entry.attempt, message=f"{known['message']} (its error "
                                           "record could not be written; a re-run of the batch redoes it)"))
        return _compact(failure_record(entry_id=entry.id, line=entry.line, input_uri=entry.image,
                                       target_text=entry.target_text, reason="not_run", attempt=entry.attempt,
                                       message="no record after the batch (worker lost?); a re-run of the batch "
                                               "redoes it"))

    with ThreadPoolExecutor(max_workers=store.read_concurrency) as pool:
        return list(pool.map(read, entries))


def held_by_others(entries: list[Entry], store: Storage, holder: str) -> tuple[list[Entry], list[Entry]]:
    """(held, freed) of `entries`: those another live run holds now, and those nobody holds that have neither
    a record nor an error record (their holder ended without finishing them, or never began)."""
    held, freed = [], []
    for entry, summary in zip(entries, read_summaries(entries, store, holder), strict=True):
        record = json.loads(summary)
        if record["status"] == "in_progress":
            held.append(entry)
        elif record.get("error", {}).get("reason") == "not_run":
            freed.append(entry)
    return held, freed


def _stored_json(store: Storage, key: str):
    """The object at `key`, parsed; None when there is none or it is not JSON. A transient store error is
    raised (to be retried), never taken for a missing object."""
    try:
        return json.loads(store.read_bytes(key))
    except StorageError as err:
        if err.transient:
            raise
        return None
    except ValueError:
        return None


def _compact(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()
