"""A report of the whole batch, for people and dashboards: `report.json`, a contact-sheet index, and the
outputs as a dataset (`edits.parquet`; `metadata.jsonl` for `datasets`' ImageFolder).

Every entry of the manifest is in it: edited now (`succeeded`, `failed`), `finished_before`, `changed`
(its record answers another request and was not redone), `failed_before` (not retried), `already_done`,
`in_progress` (another run of the batch holds it).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from datetime import datetime, timezone
from html import escape

from imagic.batch.outputs import (BATCHES, DATASET_FILE, ERROR_FILE, INDEX_FILE, METADATA_FILE, REPORT_FILE,
                                  SCHEMA_VERSION, SHEET_FILE, attempt_folder, batch_key, relative_link, scan)
from imagic.engine.result import SELECTED_FILE
from imagic.io.storage import Storage, StorageError, compare_and_swap
FINISHED = ("succeeded", "already_done", "finished_before", "changed")  # statuses whose row has outputs
SHARED_INDEX_FILE = "index.shared.html"  # links that open in a browser without credentials (S3: presigned)


def run_records(planned, *, rejected: list[dict], edited: list[dict], failed_before: list[dict]) -> list[dict]:
    """Every entry's record, each with the status it has in this run: rejected lines' and this run's edits
    as they are, then those finished before, changed, and failed before (`planned`: the run's `Plan`)."""
    records = rejected + edited
    records += [{**json.loads(summary), "status": "finished_before"} for _, summary in planned.done]
    records += [{**json.loads(summary), "status": "changed", "changes": changes}
                for _, summary, changes in planned.changed]
    records += [{**record, "status": "failed_before"} for record in failed_before]
    return records


def run_info(run_id: str, manifest_uri: str, output_uri: str, model: str, redo: str) -> dict:
    """Which run a report is of; `run_name` also names its kept copy (`runs/<run name>/`)."""
    return {"run_id": run_id, "manifest_uri": manifest_uri, "output_uri": output_uri, "model": model, "redo": redo,
            "run_name": f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{run_id[:8]}"}


def batch_report(batch_id: str, records: list[dict], *, seconds: float, run: dict | None = None) -> dict:
    """`records` are every entry's, each with the status it has in this run (see the module doc);
    `run` says which run (id, name, manifest, output, model)."""
    rows = [_row(r) for r in records]
    statuses = Counter(row["status"] for row in rows)
    verdicts = Counter(row.get("verdict") for row in rows if row["status"] in FINISHED)
    this_run = [r for r in records if r["status"] in ("succeeded", "failed", "already_done")]
    edit_seconds = sum(r.get("seconds", {}).get("total", 0.0) for r in this_run)
    gpu_seconds = sum(r.get("seconds", {}).get("total", 0.0) for r in this_run if "cuda" in r.get("device", ""))
    return {
        "schema_version": SCHEMA_VERSION, "batch_id": batch_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(run or {}),
        "counts": {"total": len(rows), "succeeded": statuses["succeeded"], "failed": statuses["failed"],
                   "skipped": statuses["finished_before"] + statuses["already_done"] + statuses["failed_before"],
                   "changed": statuses["changed"], "failed_before": statuses["failed_before"],
                   "in_progress": statuses["in_progress"],
                   "selected": verdicts["selected"], "needs_review": verdicts["needs_review"]},
        "failures": [{"entry_id": r["entry_id"], "line": r["manifest_line"], **r["error"]}
                     for r in records if r["status"] == "failed"],
        "changed": [{"entry_id": row["entry_id"], "changes": row["changes"]} for row in rows
                    if row["status"] == "changed"],
        "needs_review": [{"entry_id": row["entry_id"], "reason": row["review_reason"]}
                         for row in rows if row.get("verdict") == "needs_review"],
        "entries": rows,
        "wall_seconds": seconds, "edit_seconds": edit_seconds, "gpu_seconds": gpu_seconds,
    }


def _row(record: dict) -> dict:
    row = {"entry_id": record["entry_id"], "status": record["status"], "attempt": record.get("attempt", 1),
           "folder": record.get("folder") or record["entry_id"], "line": record.get("manifest_line"),
           "target_text": record.get("target_text"), "input": record.get("input", {}).get("uri"),
           "seconds": round(record.get("wall_seconds", 0.0), 2)}
    if "changes" in record:
        row["changes"] = record["changes"]
    if record["status"] == "in_progress":
        row["holder"] = record.get("holder", {}).get("holder")
    elif "error" not in record:
        row.update(model=record["model"], created_at=record.get("created_at"), etas=record["etas"],
                   seeds=record["seeds"], contact_sheet=record["outputs"]["contact_sheet"])
        selection = record.get("selection") or {}
        row["verdict"] = selection.get("verdict", "not_scored")
        if selection.get("verdict") == "selected":
            row.update(selected_eta=selection["eta"], selected_seed=selection["seed"], selected=selection["uri"],
                       edit_score=selection["scores"]["edit"], fidelity_score=selection["scores"]["fidelity"])
        elif selection:
            row["review_reason"] = selection["reason"]
    else:
        row.update(reason=record["error"]["reason"], message=record["error"]["message"])
    return row


def report_html(report: dict, link) -> str:
    """A contact-sheet index. `link(key)` turns a store key into an href (relative, or presigned)."""
    rows = []
    for row in report["entries"]:
        folder = row["folder"]
        if row["status"] in FINISHED:
            cell = f'<img src="{escape(link(f"{folder}/{SHEET_FILE}"))}" height="160">'
            if row.get("verdict") == "selected":
                choice = (f'<img src="{escape(link(f"{folder}/{SELECTED_FILE}"))}" height="96" '
                          f'style="border:4px solid #0a3"><br>η={row["selected_eta"]:g} seed={row["selected_seed"]}'
                          f'<br>edit {row["edit_score"]:.3f} · fidelity {row["fidelity_score"]:.2f}')
            else:
                choice = f'<b>needs review</b><br>{escape(row.get("review_reason", row.get("verdict", "")))}'
        elif row["status"] == "in_progress":
            cell, choice = escape(f'being edited by run {row.get("holder")}'), ""
        else:
            cell, choice = escape(f'{row.get("reason", "")}: {row.get("message", "")}'), ""
        status = row["status"] + (f'<br>({escape(", ".join(row["changes"]))})' if row.get("changes") else "")
        rows.append(f"<tr><td>{escape(row['entry_id'])}</td><td>{escape(row.get('target_text') or '')}</td>"
                    f"<td>{status}</td><td>{row['seconds']}</td><td>{choice}</td><td>{cell}</td></tr>")
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    title = escape(report["batch_id"])
    return (f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>Batch {title}</h1>"
            f"<p>run {escape(str(report.get('run_name', '')))} at {escape(report['created_at'])}, "
            f"model {escape(str(report.get('model', '')))}</p><p>{counts}</p>"
            "<table border=1 cellpadding=4><tr><th>entry</th><th>target text</th><th>status</th><th>seconds</th>"
            "<th>selected</th><th>contact sheet</th></tr>" + "".join(rows) + "</table>\n")


def dataset_rows(report: dict, records: dict[str, dict], store: Storage) -> list[dict]:
    """One row per entry × η × seed (one row, no image, for a failed entry). `records` by entry id."""
    rows = []
    for row in report["entries"]:
        base = {"batch_id": report["batch_id"], "entry_id": row["entry_id"], "attempt": row["attempt"],
                "status": row["status"], "input_uri": row["input"], "target_text": row["target_text"],
                "model": row.get("model"), "verdict": row.get("verdict"), "error_reason": row.get("reason")}
        record = records.get(row["entry_id"], {})
        images = record.get("outputs", {}).get("images", []) if row["status"] in FINISHED else []
        if not images:
            rows.append({**base, "eta": None, "seed": None, "file_name": None, "image_uri": None, "edit": None,
                         "fidelity": None, "selected": False})
        for image in images:
            file_name = f"{row['folder']}/{image['file']}"
            rows.append({**base, "eta": image["eta"], "seed": image["seed"], "file_name": file_name,
                         "image_uri": store.url_for(file_name), "edit": image.get("edit"),
                         "fidelity": image.get("fidelity"),
                         "selected": (row.get("selected_eta"), row.get("selected_seed")) == (image["eta"], image["seed"])})
    return rows


def parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("batch_id", pa.string()), ("entry_id", pa.string()), ("attempt", pa.int32()),
                        ("status", pa.string()), ("input_uri", pa.string()), ("target_text", pa.string()),
                        ("model", pa.string()), ("eta", pa.float64()), ("seed", pa.int64()),
                        ("file_name", pa.string()), ("image_uri", pa.string()), ("edit", pa.float64()),
                        ("fidelity", pa.float64()), ("selected", pa.bool_()), ("verdict", pa.string()),
                        ("error_reason", pa.string())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    return buffer.getvalue()


CURRENT = ("succeeded", "already_done", "finished_before")  # rows whose outputs answer the manifest as it is now


def metadata_jsonl(rows: list[dict], earlier: bytes | None) -> bytes:
    """The store's ImageFolder metadata: every output that answers its entry's current request (this batch's,
    plus the `earlier` file's lines of entries not in it), sorted, with nothing run-dependent in it: an
    unchanged batch writes the same bytes."""
    ours = {row["entry_id"] for row in rows}
    earlier = [json.loads(line) for line in (earlier or b"").decode().splitlines() if line]
    keys = ("file_name", "entry_id", "attempt", "input_uri", "target_text", "model", "eta", "seed", "edit",
            "fidelity", "selected")
    lines = [line for line in earlier if line.get("entry_id") not in ours]
    lines += [{key: row[key] for key in keys} for row in rows if row["file_name"] and row["status"] in CURRENT]
    return "".join(json.dumps(line) + "\n" for line in sorted(lines, key=lambda line: line["file_name"])).encode()


def update_metadata(store: Storage, rows: list[dict]) -> None:
    """Merge this batch's rows into the store's `metadata.jsonl` with a compare-and-swap, so that batches
    sharing an output root never lose each other's lines. One file, not one per batch: `datasets`'
    ImageFolder reads a single metadata file per folder."""
    compare_and_swap(store, METADATA_FILE, lambda earlier: metadata_jsonl(rows, earlier))


def write_report(store: Storage, report: dict, records: dict[str, dict]) -> dict[str, str]:
    """Write the report, index and dataset twice: as the batch's latest, and under `runs/<run>/` (kept).
    Returns where they are (`share_index`: a link a browser opens without credentials)."""
    rows = dataset_rows(report, records, store)
    run = report.get("run_name") or report["created_at"].replace(":", "")
    table = parquet_bytes(rows)
    for where in (run, None):
        index_key = batch_key(report["batch_id"], INDEX_FILE, where)
        store.write_bytes(batch_key(report["batch_id"], DATASET_FILE, where), table)
        store.write_bytes(index_key, report_html(report, lambda key, at=index_key: relative_link(at, key)).encode())
    shared_key = batch_key(report["batch_id"], SHARED_INDEX_FILE, run)
    store.write_bytes(shared_key, report_html(report, store.share_url).encode())
    update_metadata(store, rows)
    where = {"report": store.url_for(batch_key(report["batch_id"], REPORT_FILE)),
             "index": store.url_for(batch_key(report["batch_id"], INDEX_FILE)),
             "dataset": store.url_for(batch_key(report["batch_id"], DATASET_FILE)),
             "metadata": store.url_for(METADATA_FILE)}
    report["links"] = dict(where)
    # Not in report.json: a presigned link is a bearer credential that expires; it goes to the Prefect UI.
    where["share_index"] = store.share_url(shared_key)
    data = (json.dumps(report, indent=2) + "\n").encode()
    store.write_bytes(batch_key(report["batch_id"], REPORT_FILE, run), data)
    store.write_bytes(batch_key(report["batch_id"], REPORT_FILE), data)  # the latest, last
    return where


def batch_status(store: Storage, output_uri: str) -> dict:
    """What the output store at `output_uri` holds, from one listing: entries finished and failed (with
    reasons), redone, and the latest report's counts. Raises StorageError when it holds nothing."""
    keys = store.list()
    if not keys:
        raise StorageError(f"{output_uri}: no outputs here (is the path right?)")
    attempts = {entry_id: a for entry_id, a in scan(keys).items() if a.latest}
    failed = sorted(e for e, a in attempts.items() if a.state == "failed")
    reasons = Counter(json.loads(store.read_bytes(f"{attempt_folder(e, attempts[e].latest)}/{ERROR_FILE}"))
                      ["error"]["reason"] for e in failed)
    reports = sorted((k for k in keys if k.startswith(f"{BATCHES}/") and k.count("/") == 2
                      and k.endswith(f"/{REPORT_FILE}")),
                     key=lambda k: json.loads(store.read_bytes(k)).get("created_at", ""))
    last = None
    if reports:
        report = json.loads(store.read_bytes(reports[-1]))
        last = {"uri": store.url_for(reports[-1]), "batch_id": report["batch_id"], "created_at": report["created_at"],
                "counts": report["counts"]}
    return {"finished": sum(1 for a in attempts.values() if a.state == "finished"), "failed": len(failed),
            "failure_reasons": dict(reasons), "redone": sum(1 for a in attempts.values() if a.latest > 1),
            "last_report": last}
