"""Manifest → validated entries → skip finished → chunks → edit (here, or on a work pool) → report."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Literal

import prefect.runtime.flow_run
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Completed, Failed, State

from flows.edit_chunk import load_editor, run_chunk
from flows.retry import STORAGE_RETRIES
from imagic.batch import Plan, chunk, plan, read_records, reject
from imagic.config import DEFAULT_MODEL, Redo
from imagic.layout import SHEET_FILE
from imagic.manifest import Entry, detect_format, read_manifest_text, runnable, validate_manifest
from imagic.model_store import known_model_sha256
from imagic.report import batch_report, write_report
from imagic.settings import Settings
from imagic.storage import open_storage

EDIT_CHUNK_DEPLOYMENT = "edit-chunk/edit-chunk"
# Above this share of the manifest's entries failing, the flow run ends Failed so that automations alert.
MAX_FAILURE_FRACTION = 0.5


@task(**STORAGE_RETRIES)
def read_manifest(manifest_uri: str) -> str:
    """The manifest's text (transient faults retried: it may live in S3 or behind HTTP)."""
    return read_manifest_text(manifest_uri)


@task(**STORAGE_RETRIES)
def plan_batch(entries: list[Entry], output_uri: str, model: str, redo: Redo, check_inputs: bool) -> Plan:
    """Resume by request: done, changed (not redone unless asked), failed, to do — see imagic.batch.plan."""
    return plan(entries, open_storage(output_uri), model=model, model_hash=known_model_sha256(model), redo=redo,
                check_inputs=check_inputs)


@task(**STORAGE_RETRIES)
def collect_records(entries: list[Entry], output_uri: str, holder: str | None = None) -> list[dict]:
    """Each entry's record (or error record) from the store: the store, not the children, is the truth."""
    return read_records(entries, open_storage(output_uri), holder)


def chunk_key(parent_run_id: str, entries: list[Entry]) -> str:
    """Deterministic per (parent run, chunk): a retried submission returns the child it already created.

    Not deterministic across parent runs on purpose: re-running a batch after a crash must start new
    children for its unfinished chunks, not get back the dead child of the crashed run.
    """
    digest = hashlib.sha256(json.dumps([e.folder for e in entries]).encode()).hexdigest()[:16]
    return f"{parent_run_id}-{digest}"


@task(retries=3, retry_delay_seconds=[5, 15, 60], cache_policy=NO_CACHE)
def run_chunk_deployment(entries: list[Entry], output_uri: str, model: str, device: str, deployment: str,
                         key: str, source: dict) -> int:
    """One `edit-chunk` run on the work pool; waits for it. Retried on API errors (the key makes that safe).

    The child gets references into the manifest (`source`: its URI, preset and overrides), not the
    entries: input URIs may carry credentials, and flow-run parameters are stored and shown by Prefect."""
    from prefect.deployments import run_deployment

    child = run_deployment(
        deployment,
        parameters={"entries": [{"id": e.id, "attempt": e.attempt} for e in entries], "output_uri": output_uri,
                    "model": model, "device": device, **source},
        idempotency_key=key, timeout=None, as_subflow=True,
    )
    if not child.state or not child.state.is_completed():
        # Per-entry failures are records, so a failed child means lost infrastructure (OOM, evicted pod):
        # its entries show up as `not_run` in the report and are redone by the next run of the batch.
        get_run_logger().warning("chunk run %s ended %s", child.name, child.state.name if child.state else None)
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


def dispatch_deployments(chunks: list[list[Entry]], output_uri: str, model: str, device: str,
                         max_in_flight: int, deployment: str, on_done, source: dict) -> None:
    """One `edit-chunk` run per chunk on the work pool, at most `max_in_flight` at a time."""
    check_deployment(deployment)
    parent_run_id = str(prefect.runtime.flow_run.id)
    in_flight = []
    for entries in chunks:
        if len(in_flight) >= max_in_flight:
            finished = next(as_completed(in_flight))
            in_flight.remove(finished)
            on_done(finished.result())
        in_flight.append(run_chunk_deployment.submit(entries, output_uri, model, device, deployment,
                                                     chunk_key(parent_run_id, entries), source))
    for finished in as_completed(in_flight):
        on_done(finished.result())


def run_name() -> str:
    """Findable flow-run names: `bulk-edit manifest.jsonl → s3://bucket/out`."""
    parameters = prefect.runtime.flow_run.parameters
    return f"bulk-edit {parameters['manifest_uri'].rsplit('/', 1)[-1]} → {parameters['output_uri']}"


@flow(name="bulk-edit", flow_run_name=run_name, log_prints=True)
def bulk_edit(
    manifest_uri: str,
    output_uri: str,
    mode: Literal["local", "deployment"] = "local",
    model: str | None = None,
    preset: str | None = None,
    overrides: dict | None = None,
    chunk_size: int = 8,
    max_in_flight: int = 4,
    device: str = "auto",
    batch_id: str | None = None,
    deployment: str = EDIT_CHUNK_DEPLOYMENT,
    max_failure_fraction: float = MAX_FAILURE_FRACTION,
    redo: Redo = Redo.failed,
    check_inputs: bool = True,
):
    """Edit every entry of a manifest into `output_uri`; resumable by request, with a report of the batch.

    `redo`: besides new entries, what to edit again — `failed` (default), `changed` (entries whose finished
    record answers another request: model, config, η grid, input content…), `all`, or `none`. A redone
    entry gets a new attempt folder; nothing finished is overwritten.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    # 1. Read and validate, then plan
    text = read_manifest(manifest_uri)
    # Validation is not retried: a file that cannot run stops here, listing every problem with its line.
    entries, rejected, file_problems = validate_manifest(text, detect_format(manifest_uri), preset=preset,
                                                         overrides=overrides, model=model)
    entries = runnable(entries, rejected, file_problems)
    if rejected:
        logger.warning("%d invalid entries:\n%s", len(rejected), "\n".join(p for r in rejected for p in r.problems))
    model = model or entries[0].model or DEFAULT_MODEL  # the run's, else the manifest's, else the toy model
    planned = plan_batch(entries, output_uri, model, Redo(redo), check_inputs)
    todo = planned.todo
    batch_id = batch_id or hashlib.sha256(f"{manifest_uri}|{output_uri}".encode()).hexdigest()[:12]
    logger.info("%d entries: %d to do, %d finished before, %d changed (not redone: --redo changed), "
                "%d failed before (not retried)", len(entries), len(todo), len(planned.done), len(planned.changed),
                len(planned.failed))
    for entry, _, changes in planned.changed:
        logger.warning("%s: changed (%s); kept as it is", entry.id, ", ".join(changes))

    # 2. Edit, chunk by chunk
    progress = create_progress_artifact(0.0, key=f"bulk-edit-{batch_id}", description="entries finished")
    finished = 0

    def on_done(count: int) -> None:
        nonlocal finished
        finished += count
        update_progress_artifact(progress, 100.0 * finished / max(1, len(todo)))

    chunks = chunk(todo, chunk_size)
    holder = str(prefect.runtime.flow_run.id)  # entries are claimed for this run: a concurrent run skips them
    if mode == "local" and todo:
        editor = load_editor(model, device)  # once for the whole batch
        settings = Settings.from_env("local")
        for entries_of_chunk in chunks:
            run_chunk(editor, entries_of_chunk, output_uri, model, settings, holder)
            on_done(len(entries_of_chunk))
    elif mode == "deployment" and todo:
        source = {"manifest_uri": manifest_uri, "preset": preset, "overrides": overrides, "holder": holder}
        dispatch_deployments(chunks, output_uri, model, device, max_in_flight, deployment, on_done, source)

    # 3. Report: every entry of the manifest, whatever this run did with it
    store = open_storage(output_uri)
    records = reject(store, rejected) + collect_records(todo, output_uri, holder)
    records += [{**record, "status": "finished_before"} for _, record in planned.done]
    records += [{**record, "status": "changed", "changes": changes} for _, record, changes in planned.changed]
    records += [{**record, "status": "failed_before"} for record in collect_records(planned.failed, output_uri)]
    run = {"run_id": holder, "manifest_uri": manifest_uri, "output_uri": output_uri,
           "model": model, "redo": Redo(redo).value,
           "run_name": f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{holder[:8]}"}
    report = batch_report(batch_id, records, seconds=time.perf_counter() - started, run=run)
    links = write_report(store, report, {r["entry_id"]: r for r in records})
    publish_report(report, links, store.share_url)
    return final_state(report, max_failure_fraction)


def final_state(report: dict, max_failure_fraction: float = MAX_FAILURE_FRACTION) -> State:
    """The final state dashboards show: counts in the message, the report as the result; Failed when more
    than `max_failure_fraction` of the manifest's entries failed in this run."""
    counts = report["counts"]
    message = f"{counts['succeeded']} succeeded, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts.get("changed"):
        message += f", {counts['changed']} changed (not redone: --redo changed)"
    if counts.get("in_progress"):
        message += f", {counts['in_progress']} in progress in another run"
    fraction = counts["failed"] / max(1, counts["total"])
    if fraction > max_failure_fraction:
        return Failed(message=f"{message}: {counts['failed']} of {counts['total']} entries failed "
                              f"({fraction:.0%} > max_failure_fraction {max_failure_fraction:g})", data=report)
    return Completed(message=message, data=report)


GALLERY_SIZE = 24  # contact sheets shown in the Prefect UI: those that need a look first


def publish_report(report: dict, links: dict, share_url=None) -> None:
    """Table, summary and contact-sheet artifacts for the Prefect UI. `share_url(key)` makes the links a
    browser opens (presigned for S3); without it, the gallery is left out."""
    key = f"bulk-edit-{report['batch_id']}"
    create_table_artifact(report["entries"], key=f"{key}-entries", description="one row per entry")
    counts = report["counts"]
    lines = [f"# Batch `{report['batch_id']}`", "",
             f"**{counts['succeeded']} succeeded · {counts['failed']} failed · {counts['skipped']} skipped · "
             f"{counts['changed']} changed** of {counts['total']} in {report['wall_seconds']:.0f} s "
             f"(GPU-seconds {report['gpu_seconds']:.0f})",
             f"{counts['selected']} with an output selected automatically · "
             f"**{counts['needs_review']} need review**", "",
             f"Report: `{links['report']}` · [index]({links['share_index']}) · dataset: `{links['dataset']}`"]
    if report["needs_review"]:
        lines += ["", "| entry | needs review because |", "|---|---|"]
        lines += [f"| {r['entry_id']} | {r['reason']} |" for r in report["needs_review"]]
    if report["changed"]:
        lines += ["", "| entry | changed since its record (rerun with --redo changed) |", "|---|---|"]
        lines += [f"| {c['entry_id']} | {', '.join(c['changes'])} |" for c in report["changed"]]
    if report["failures"]:
        lines += ["", "| entry | line | reason | message |", "|---|---|---|---|"]
        lines += [f"| {f['entry_id']} | {f['line']} | {f['reason']} | {f['message'][:120]} |"
                  for f in report["failures"]]
    create_markdown_artifact("\n".join(lines), key=f"{key}-summary")
    if share_url is not None:
        create_markdown_artifact(contact_sheet_gallery(report, share_url), key=f"{key}-contact-sheets",
                                 description="contact sheets, those that need review first")


def contact_sheet_gallery(report: dict, share_url) -> str:
    rows = [row for row in report["entries"] if row.get("contact_sheet")]
    rows.sort(key=lambda row: row.get("verdict") != "needs_review")
    lines = [f"# Contact sheets of batch `{report['batch_id']}`", ""]
    for row in rows[:GALLERY_SIZE]:
        verdict = (f"selected η={row['selected_eta']:g}" if row.get("verdict") == "selected"
                   else f"needs review: {row.get('review_reason', row.get('verdict'))}")
        lines += [f"**{row['entry_id']}** — {row['target_text']} — {verdict}", "",
                  f"![{row['entry_id']}]({share_url(row['folder'] + '/' + SHEET_FILE)})", ""]
    if len(rows) > GALLERY_SIZE:
        lines.append(f"… and {len(rows) - GALLERY_SIZE} more in the index.")
    return "\n".join(lines)
