"""The per-GPU unit: load the model once, edit each entry of a chunk, write outputs then records."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import prefect.runtime.flow_run
import psutil
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import MODEL_LOAD_RETRIES, STORAGE_RETRIES
from imagic.batch.manifest import Entry, read_entries_jsonl
from imagic.batch.outputs import RECORD_FILE
from imagic.batch.run import run_entry
from imagic.batch.settings import Settings
from imagic.engine.builtins import DEFAULT_MODEL
from imagic.io.storage import StorageError, open_storage

if TYPE_CHECKING:
    from imagic.engine.editor import Editor


@task(**MODEL_LOAD_RETRIES, cache_policy=NO_CACHE)
def load_editor(model: str, device: str = "auto") -> Editor:
    """Load the pipeline, syncing an s3:// model to the local cache first (retried: both are I/O)."""
    import torch  # here, not at import: a parent that only plans and dispatches never loads torch

    from imagic.engine.editor import Editor

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Editor.from_pretrained(model, device)


@task(cache_policy=NO_CACHE)  # its input is a loaded model: nothing to hash or cache
def edit_entry(editor: Editor, entry: Entry, output_uri: str, model: str, settings: Settings,
               holder: str | None = None, stop: Callable[[], bool] | None = None,
               overhead_seconds: float = 0.0) -> dict:
    """Edit one entry; a bad input becomes an error record, not a failed task."""
    store = open_storage(output_uri)
    try:
        done = store.exists(f"{entry.folder}/{RECORD_FILE}")  # e.g. a stale chunk run from a crashed batch
    except StorageError:
        done = False  # the store is failing: the edit finds out for itself, and fails the entry with its reason
    if done:
        get_run_logger().info("%s: already done", entry.folder)
        return {"entry_id": entry.id, "status": "already_done", "reason": None}
    record = run_entry(editor, entry, store, model=model, settings=settings, holder=holder, stop=stop,
                       overhead_seconds=overhead_seconds)
    get_run_logger().info("%s: %s%s", entry.folder, record["status"],
                          f" ({record['message']})" if record["status"] == "preempted" else "")
    return _row(record)


def run_chunk(editor: Editor, entries: list[Entry], output_uri: str, model: str, settings: Settings,
              holder: str | None = None, overhead_seconds: float = 0.0) -> list[dict]:
    """Each entry in turn; after SIGTERM (a spot node reclaimed), the entry being trained saves its training
    and the chunk stops there, failing its run (`ChunkPreempted`) so that it is tried again — the retry
    resumes that entry from its last checkpoint."""
    rows = []
    with stop_on_sigterm() as stopping:
        for entry in entries:
            rows.append(edit_entry(editor, entry, output_uri, model, settings, holder, stopping.is_set,
                                   overhead_seconds))
            if stopping.is_set():
                break
    if stopping.is_set():
        raise ChunkPreempted(f"stopped by SIGTERM after {len(rows)} of {len(entries)} entries; "
                             f"{sum(row['status'] == 'preempted' for row in rows)} saved to resume")
    return rows


class ChunkPreempted(RuntimeError):
    """The chunk's worker was asked to stop (SIGTERM); what it had is saved, the rest is for a retry."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs; the handler before (Prefect's) is back after it. Outside
    the main thread, where Python takes no signal handlers, the event is never set."""
    stopping = threading.Event()
    try:
        earlier = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    except ValueError:  # not the main thread
        yield stopping
        return
    try:
        yield stopping
    finally:
        signal.signal(signal.SIGTERM, earlier)


@task(**STORAGE_RETRIES)
def read_chunk(output_uri: str, chunk: str, references: list[dict]) -> list[Entry]:
    """The chunk's entries as the parent wrote them into the output store (validated there, not here)."""
    entries = read_entries_jsonl(open_storage(output_uri).read_bytes(chunk))
    if [(e.id, e.attempt) for e in entries] != [(r["id"], r.get("attempt", 1)) for r in references]:
        get_run_logger().warning("%s holds other entries than the run was given; editing what it holds", chunk)
    return entries


def run_name() -> str:
    """Findable flow-run names: `edit-chunk cat-1…dog-9 (8)`."""
    entries = prefect.runtime.flow_run.parameters["entries"]
    return f"edit-chunk {entries[0]['id']}…{entries[-1]['id']} ({len(entries)})" if entries else "edit-chunk (empty)"


@flow(name="edit-chunk", flow_run_name=run_name, log_prints=True)
def edit_chunk(entries: list[dict], output_uri: str, model: str = DEFAULT_MODEL, device: str = "auto",
               chunk: str | None = None, holder: str | None = None) -> list[dict]:
    """Edit a chunk of manifest entries on one worker (one GPU).

    `entries`: with `chunk` (the key of the chunk's entries in the output store, as the parent sends it),
    their references (`{"id", "attempt"}`) — so input URIs, which may carry signatures, never become
    flow-run parameters that the Prefect API stores and shows; without, whole entries. Nothing is read from
    the disk of whoever started the batch. `holder`: the parent run, which claims each entry before editing
    it. The operator's settings for deployment mode apply (`imagic/batch/settings.py`: inputs from `s3://`
    only unless IMAGIC_ALLOWED_INPUTS says otherwise).
    """
    settings = Settings.from_env("deployment")
    chosen = read_chunk(output_uri, chunk, entries) if chunk is not None else [Entry(**e) for e in entries]
    editor = load_editor(model, device)
    # Each entry's share of what the pod spent before its first edit: start, imports, model load and hash.
    overhead = worker_overhead(editor, psutil.Process().create_time(), wall_clock=True) / max(1, len(chosen))
    return run_chunk(editor, chosen, output_uri, model, settings, holder, overhead)


def worker_overhead(editor: Editor, since: float, *, wall_clock: bool = False) -> float:
    """Seconds from `since` (`time.perf_counter()`, or with `wall_clock` a `time.time()`, e.g. the process's
    start) until the editor is ready: loaded, and its model hashed (cached, then free for every record)."""
    from imagic.engine.identity import model_sha256

    model_sha256(editor.pipeline.name_or_path)
    return (time.time() if wall_clock else time.perf_counter()) - since


def _row(record: dict) -> dict:
    """What travels back to the parent: small, no tensors, no images."""
    return {"entry_id": record["entry_id"], "status": record["status"],
            "reason": record.get("error", {}).get("reason"), "message": record.get("error", {}).get("message")}
