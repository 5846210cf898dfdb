"""Deployment mode: one `edit-chunk` run per chunk on the work pool, at most `max_in_flight` at a time."""

from __future__ import annotations

import hashlib
import json

import prefect.runtime.flow_run
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.retry import DISPATCH_RETRIES, STORAGE_RETRIES
from flows.zombies import ensure_zombie_automation
from imagic.batch.manifest import Entry, entries_jsonl
from imagic.batch.outputs import chunk_slice_key
from imagic.io.storage import open_storage

EDIT_CHUNK_DEPLOYMENT = "edit-chunk/edit-chunk"


def chunk_key(parent_run_id: str, entries: list[Entry]) -> str:
    """Deterministic per (parent run, chunk): a retried submission returns the child it already created.

    Not deterministic across parent runs on purpose: re-running a batch after a crash must start new
    children for its unfinished chunks, not get back the dead child of the crashed run.
    """
    digest = hashlib.sha256(json.dumps([e.folder for e in entries]).encode()).hexdigest()[:16]
    return f"{parent_run_id}-{digest}"


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def write_chunk(entries: list[Entry], output_uri: str, batch_id: str, key: str) -> str:
    """The chunk's entries, validated, into the output store: all its run reads (never the caller's disk, never
    the whole manifest). Returns the key."""
    slice_key = chunk_slice_key(batch_id, key)
    open_storage(output_uri).write_bytes(slice_key, entries_jsonl(entries))
    return slice_key


CHUNK_TRIES = 3  # runs of one chunk: a preempted or lost pod's chunk is run again (each resumes what it saved)


@task(**DISPATCH_RETRIES, cache_policy=NO_CACHE)
def run_chunk_deployment(entries: list[Entry], output_uri: str, model: str, device: str, deployment: str,
                         key: str, chunk: str, holder: str) -> int:
    """One `edit-chunk` run on the work pool; waits for it. Retried on API errors (the key makes that safe).

    The child gets the key of its chunk's entries in the output store and their ids, not the entries:
    input URIs may carry credentials, and flow-run parameters are stored and shown by Prefect."""
    from prefect.deployments import run_deployment

    for attempt in range(1, CHUNK_TRIES + 1):
        child = run_deployment(
            deployment,
            parameters={"entries": [{"id": e.id, "attempt": e.attempt} for e in entries], "output_uri": output_uri,
                        "model": model, "device": device, "chunk": chunk, "holder": holder},
            idempotency_key=key if attempt == 1 else f"{key}-try-{attempt}", timeout=None, as_subflow=True,
        )
        if child.state and child.state.is_completed():
            break
        # Per-entry failures are records, so a failed child means lost infrastructure (a spot node reclaimed,
        # OOM, an evicted pod): run the chunk again; its entries already finished are skipped, a preempted one
        # resumes from its checkpoint. After the last try they show up as `not_run` for the next batch run.
        get_run_logger().warning("chunk run %s ended %s (try %d of %d)", child.name,
                                 child.state.name if child.state else None, attempt, CHUNK_TRIES)
    return len(entries)


def check_deployment(deployment: str) -> None:
    """Fail at once, saying what to do, when the chunk deployment is not registered (not after retries)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ValueError(f"deployment {deployment!r} is not registered on {client.api_url}: register it with "
                             "`prefect deploy --all` (prefect.yaml; docs/deploy.md), or use mode=local") from None


def dispatch_deployments(chunks: list[list[Entry]], output_uri: str, batch_id: str, model: str, device: str,
                         max_in_flight: int, deployment: str, on_done) -> None:
    """One `edit-chunk` run per chunk on the work pool, at most `max_in_flight` at a time; each chunk's
    entries are written to the store just before its run is submitted."""
    check_deployment(deployment)
    ensure_zombie_automation()  # a chunk run whose pod dies without a word is ended, and run again below
    parent_run_id = str(prefect.runtime.flow_run.id)  # the holder of every claim the chunk runs take
    in_flight = []
    for entries in chunks:
        if len(in_flight) >= max_in_flight:
            finished = next(as_completed(in_flight))
            in_flight.remove(finished)
            on_done(finished.result())
        key = chunk_key(parent_run_id, entries)
        chunk = write_chunk(entries, output_uri, batch_id, key)
        in_flight.append(run_chunk_deployment.submit(entries, output_uri, model, device, deployment, key, chunk,
                                                     parent_run_id))
    for finished in as_completed(in_flight):
        on_done(finished.result())
