"""The per-GPU unit: load the model once, edit each entry of a chunk, write outputs then records."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imagic import Editor, load_pipeline
from imagic.batch import RECORD_FILE, run_entry
from imagic.manifest import Entry
from imagic.model_store import local_model
from imagic.models import ModelError
from imagic.storage import open_storage


def _transient(task, task_run, state) -> bool:
    """Retry I/O trouble, not a model that is missing or incomplete (retrying cannot fix that)."""
    return not isinstance(state.result(raise_on_failure=False), ModelError)


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=_transient, cache_policy=NO_CACHE)
def load_editor(model: str, device: str = "auto") -> Editor:
    """Load the pipeline, syncing an s3:// model to the local cache first (retried: both are I/O)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Editor(load_pipeline(local_model(model), device))


@task(cache_policy=NO_CACHE)  # its input is a loaded model: nothing to hash or cache
def edit_entry(editor: Editor, entry: Entry, output_uri: str, model: str) -> dict:
    """Edit one entry; a bad input becomes an error record, not a failed task."""
    store = open_storage(output_uri)
    if store.exists(f"{entry.id}/{RECORD_FILE}"):  # e.g. a stale chunk run from a crashed batch
        get_run_logger().info("%s: already done", entry.id)
        return {"entry_id": entry.id, "status": "already_done", "reason": None}
    record = run_entry(editor, entry, store, model=model)
    get_run_logger().info("%s: %s", entry.id, record["status"])
    return _row(record)


def run_chunk(editor: Editor, entries: list[Entry], output_uri: str, model: str) -> list[dict]:
    return [edit_entry(editor, entry, output_uri, model) for entry in entries]


@flow(name="edit-chunk", log_prints=True)
def edit_chunk(entries: list[dict], output_uri: str, model: str = "toy", device: str = "auto") -> list[dict]:
    """Edit a chunk of validated manifest entries on one worker (one GPU)."""
    editor = load_editor(model, device)
    return run_chunk(editor, [Entry(**e) for e in entries], output_uri, model)


def _row(record: dict) -> dict:
    """What travels back to the parent: small, no tensors, no images."""
    return {"entry_id": record["entry_id"], "status": record["status"],
            "reason": record.get("error", {}).get("reason")}
