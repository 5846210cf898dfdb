"""Manifest → validated entries → plan → chunks → edit (here, or on a work pool) → report. Thin wiring: the
logic is the batch layer's (imagic/batch/), the UI's in flows/artifacts.py, dispatch in flows/dispatch.py."""

from __future__ import annotations

import functools
import time
from typing import Literal

import prefect.runtime.flow_run
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.artifacts import MAX_FAILURE_FRACTION, Progress, final_state, publish_report, unreported
from flows.dispatch import EDIT_CHUNK_DEPLOYMENT, dispatch_deployments
from flows.edit_chunk import load_editor, run_chunk, worker_overhead
from flows.retry import STORAGE_RETRIES
from imagic.batch.catalogue import update_catalogue
from imagic.batch.manifest import (Entry, Rejected, batch_model, detect_format, read_manifest_text, runnable,
                                   stage_manifest, validate_manifest)
from imagic.batch.outputs import MANIFESTS, batch_id_for
from imagic.batch.plan import Plan, Redo, chunk, plan, plan_summary
from imagic.batch.report import batch_report, run_info, run_records, write_report
from imagic.batch.run import held_by_others, read_summaries, reject
from imagic.batch.settings import Settings
from imagic.engine.identity import known_model_sha256
from imagic.io.storage import StorageError, open_storage


@task(**STORAGE_RETRIES)
def read_manifest(manifest_uri: str) -> str:
    """The manifest's text (transient faults retried: it may live in S3 or behind HTTP)."""
    return read_manifest_text(manifest_uri)


@task(**STORAGE_RETRIES)
def stage(manifest_uri: str, text: str, output_uri: str) -> str:
    """The manifest where every pod can read it (see `stage_manifest`)."""
    return stage_manifest(open_storage(output_uri), manifest_uri, text)


# NO_CACHE: their inputs are the whole batch (100k entries, a Plan): hashing them for a cache key would
# cost the parent what the plan saves, and a store's state is never worth caching.
@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def plan_batch(entries: list[Entry], output_uri: str, model: str, redo: Redo, check_inputs: bool,
               settings: Settings) -> Plan:
    """Resume by request: done, changed (not redone unless asked), failed, to do — see imagic.batch.plan. The
    records it had to read go into the store's catalogue, so that the next run need not read them."""
    store = open_storage(output_uri)
    planned = plan(entries, store, model=model, model_hash=known_model_sha256(model), redo=redo,
                   rehash_inputs=check_inputs, input_allowed=settings.input_allowed)
    update_catalogue(store, planned.catalogue)
    planned.catalogue.clear()
    return planned


@task(**STORAGE_RETRIES, cache_policy=NO_CACHE)
def report_batch(output_uri: str, batch_id: str, planned: Plan, rejected: list[Rejected], run: dict,
                 started: float, price_per_gpu_hour: float | None = None,
                 outcomes: dict[str, dict] | None = None) -> tuple[dict, dict]:
    """Every entry of the manifest with what this run did with it: report, index, dataset (and their links).
    `outcomes`: what this run's chunks said of their entries (local mode), for those the store has no word of."""
    store = open_storage(output_uri)
    rejected_now = reject(store, rejected)
    edited = read_summaries(planned.todo, store, run["run_id"], outcomes)
    failed_before = read_summaries(planned.failed, store)

    def records():  # streamed twice, never held: once for the report's rows, once for the dataset
        return run_records(planned, rejected=rejected_now, edited=edited, failed_before=failed_before)

    report = batch_report(batch_id, records(), seconds=time.perf_counter() - started, run=run,
                          price_per_gpu_hour=price_per_gpu_hour)
    return report, write_report(store, report, records())


HELD_POLL_S = 10.0  # how often a run waiting for entries another run holds looks at them again


def wait_for_held(entries: list[Entry], output_uri: str, holder: str, wait_s: float, edit) -> None:
    """Up to `wait_s`, wait for the `entries` that another live run of the batch holds, and `edit` those it
    lets go unfinished (it died, or was stopped): a re-run after a crash, or beside a run still going, then
    ends with every entry done instead of Failed with entries in progress."""
    store, deadline = open_storage(output_uri), time.monotonic() + wait_s
    held, _ = held_by_others(entries, store, holder)
    while held and (left := deadline - time.monotonic()) > 0:
        get_run_logger().info("waiting for %d entries held by another run (%.0f s left)", len(held), left)
        time.sleep(min(HELD_POLL_S, left))
        held, freed = held_by_others(held, store, holder)
        if freed:
            edit(freed)


def run_name() -> str:
    """Findable flow-run names: `bulk-edit manifest.jsonl → s3://bucket/out`."""
    parameters = prefect.runtime.flow_run.parameters
    return f"bulk-edit {parameters['manifest_uri'].rsplit('/', 1)[-1]} → {parameters['output_uri']}"


@flow(name="bulk-edit", flow_run_name=run_name, log_prints=True)
def bulk_edit(manifest_uri: str, output_uri: str, mode: Literal["local", "deployment"] = "local",
              model: str | None = None, preset: str | None = None, overrides: dict | None = None,
              chunk_size: int = 8, max_in_flight: int = 4, device: str = "auto", batch_id: str | None = None,
              deployment: str = EDIT_CHUNK_DEPLOYMENT, max_failure_fraction: float = MAX_FAILURE_FRACTION,
              redo: Redo = Redo.failed, check_inputs: bool = True, wait_held_s: float = 0.0):
    """Edit every entry of a manifest into `output_uri`; resumable by request, with a report of the batch.

    `redo`: besides new entries, what to edit again — `failed` (default), `changed` (entries whose finished
    record answers another request: model, config, η grid, input content…), `all`, or `none`. A redone
    entry gets a new attempt folder; nothing finished is overwritten. `wait_held_s`: how long to wait for
    entries another live run of the batch holds (and to edit those it leaves undone); without it, such a run
    ends Failed.
    """
    started, holder = time.perf_counter(), str(prefect.runtime.flow_run.id)  # entries are claimed for this run
    settings = Settings.from_env("local")
    if not manifest_uri.startswith(f"{output_uri.rstrip('/')}/{MANIFESTS}/"):  # not one this project staged
        settings = settings.bounded_by(manifest_uri)
    # 1. Read and validate (not retried: a file that cannot run stops here, every problem with its line), plan
    text = read_manifest(manifest_uri)
    entries, rejected, file_problems = validate_manifest(text, detect_format(manifest_uri), preset=preset,
                                                         overrides=overrides, model=model, settings=settings)
    entries = runnable(entries, rejected, file_problems)
    model = batch_model(entries, model)
    # quote: the batch's entries (and below, its plan) are not walked by Prefect looking for futures
    planned = plan_batch(quote(entries), output_uri, model, Redo(redo), check_inputs, settings)
    batch_id = batch_id or batch_id_for(manifest_uri, output_uri)
    for level, message in plan_summary(planned, rejected):
        get_run_logger().log(level, message)

    # 2. Edit, chunk by chunk: in this process (the model loaded once), or one edit-chunk run per chunk
    progress, outcomes = Progress(batch_id, len(planned.todo)), {}

    @functools.cache
    def loaded_editor():
        loaded = time.perf_counter()
        editor = load_editor(model, device)
        return editor, worker_overhead(editor, loaded) / len(planned.todo)  # the model is loaded once for all

    def edit(todo: list[Entry]) -> None:
        if mode == "local":
            editor, overhead = loaded_editor()
            for entries_of_chunk in chunk(todo, chunk_size):
                for row in run_chunk(editor, entries_of_chunk, output_uri, model, settings, holder, overhead):
                    outcomes[row["entry_id"]] = row
                progress.advance(len(entries_of_chunk))
        else:  # no pod reads the caller's disk: the manifest and chunks are in the store
            dispatch_deployments(chunk(todo, chunk_size), output_uri, batch_id, model, device, max_in_flight,
                                 deployment, progress.advance)

    if planned.todo:
        if mode == "deployment":
            get_run_logger().info("manifest staged at %s", stage(manifest_uri, text, output_uri))
        edit(planned.todo)
        if wait_held_s:
            wait_for_held(planned.todo, output_uri, holder, wait_held_s, edit)

    # 3. Report: every entry of the manifest, whatever this run did with it
    run = run_info(holder, manifest_uri, output_uri, model, Redo(redo).value)
    try:
        report, links = report_batch(output_uri, batch_id, quote(planned), rejected, run, started,
                                     settings.gpu_hour_price, quote(outcomes))
    except StorageError as err:  # after its retries: the run ends Failed, saying what it did
        return unreported(err, outcomes)
    publish_report(report, links, open_storage(output_uri).share_url)
    return final_state(report, max_failure_fraction)
