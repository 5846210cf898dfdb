"""The per-GPU unit: load the model once, edit each entry of a chunk, write outputs then records."""

from __future__ import annotations

import prefect.runtime.flow_run
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import transient_only
from imagic import Editor, load_pipeline
from imagic.batch import run_entry
from imagic.config import DEFAULT_MODEL
from imagic.layout import RECORD_FILE
from imagic.manifest import Entry
from imagic.storage import open_storage


# Retried when syncing an s3:// model hits a transient fault; a missing or incomplete model is not retried.
@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient_only, cache_policy=NO_CACHE)
def load_editor(model: str, device: str = "auto") -> Editor:
    """Load the pipeline, syncing an s3:// model to the local cache first (retried: both are I/O)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Editor(load_pipeline(model, device))


@task(cache_policy=NO_CACHE)  # its input is a loaded model: nothing to hash or cache
def edit_entry(editor: Editor, entry: Entry, output_uri: str, model: str) -> dict:
    """Edit one entry; a bad input becomes an error record, not a failed task."""
    store = open_storage(output_uri)
    if store.exists(f"{entry.folder}/{RECORD_FILE}"):  # e.g. a stale chunk run from a crashed batch
        get_run_logger().info("%s: already done", entry.folder)
        return {"entry_id": entry.id, "status": "already_done", "reason": None}
    record = run_entry(editor, entry, store, model=model)
    get_run_logger().info("%s: %s", entry.folder, record["status"])
    return _row(record)


def run_chunk(editor: Editor, entries: list[Entry], output_uri: str, model: str) -> list[dict]:
    return [edit_entry(editor, entry, output_uri, model) for entry in entries]


def run_name() -> str:
    """Findable flow-run names: `edit-chunk cat-1…dog-9 (8)`."""
    entries = prefect.runtime.flow_run.parameters["entries"]
    return f"edit-chunk {entries[0]['id']}…{entries[-1]['id']} ({len(entries)})" if entries else "edit-chunk (empty)"


@flow(name="edit-chunk", flow_run_name=run_name, log_prints=True)
def edit_chunk(entries: list[dict], output_uri: str, model: str = DEFAULT_MODEL, device: str = "auto") -> list[dict]:
    """Edit a chunk of validated manifest entries on one worker (one GPU)."""
    editor = load_editor(model, device)
    return run_chunk(editor, [Entry(**e) for e in entries], output_uri, model)


def _row(record: dict) -> dict:
    """What travels back to the parent: small, no tensors, no images."""
    return {"entry_id": record["entry_id"], "status": record["status"],
            "reason": record.get("error", {}).get("reason")}
