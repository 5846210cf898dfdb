"""Manifest entries through the engine into a store — plain functions the Prefect flows wire together.

Per entry: read the input, edit, write images, contact sheet and artifacts, then `record.json` LAST
(create-if-absent): its presence means the entry is finished. A bad entry gets `error.json` with a
machine-readable reason instead of an exception, so it never sinks the batch; a re-run retries it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from html import escape

from imagic.editor import Editor, ProgressCallback
from imagic.images import ImageError, load_image
from imagic.manifest import Entry, Rejected
from imagic.model_store import model_sha256
from imagic.record import edit_record
from imagic.result import SELECTED_FILE, image_name, png_bytes
from imagic.sheet import contact_sheet
from imagic.storage import Storage, StorageError, read_uri

RECORD_FILE, ERROR_FILE, SHEET_FILE = "record.json", "error.json", "contact_sheet.png"


def entry_ids(store: Storage, name: str = RECORD_FILE, keys: list[str] | None = None) -> set[str]:
    """Entries that have `<id>/<name>` (one listing, not a request per entry)."""
    keys = store.list() if keys is None else keys
    return {key.split("/", 1)[0] for key in keys if key.count("/") == 1 and key.endswith("/" + name)}


def finished_ids(store: Storage) -> set[str]:
    """Entries whose record exists."""
    return entry_ids(store, RECORD_FILE)


def plan(entries: list[Entry], store: Storage) -> tuple[list[Entry], list[Entry]]:
    """(to do, already done)."""
    done = finished_ids(store)
    return [e for e in entries if e.id not in done], [e for e in entries if e.id in done]


def chunk(entries: list[Entry], size: int) -> list[list[Entry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


def run_entry(editor: Editor, entry: Entry, store: Storage, *, model: str,
              callback: ProgressCallback | None = None) -> dict:
    """Edit one entry into `store`; returns its record (status succeeded, failed, or already_done)."""
    started = time.perf_counter()
    try:
        input_bytes = read_uri(entry.image)
        image = load_image(input_bytes, name=entry.image)
        result = editor.edit(image, entry.target_text, entry.config, entry.etas, entry.seeds, callback)
    except StorageError as err:
        return _fail(store, entry, "input_unreadable", str(err), started)
    except ImageError as err:
        return _fail(store, entry, "input_not_an_image", str(err), started)
    except ValueError as err:  # e.g. target text longer than the model takes, a CUDA-only option on CPU
        return _fail(store, entry, "invalid_request", str(err), started)

    files = result.to_files()
    files[SHEET_FILE] = png_bytes(
        contact_sheet(result.input_image, result.images, title=entry.target_text, selection=result.selection)
    )
    for name, data in files.items():  # outputs first …
        store.write_bytes(f"{entry.id}/{name}", data)
    record = edit_record(
        result, input_uri=entry.image, input_bytes=input_bytes, model=model,
        model_sha256=model_sha256(editor.pipeline.name_or_path), preset=entry.preset,
        device=str(editor.device), outputs={"contact_sheet": store.url_for(f"{entry.id}/{SHEET_FILE}"),
                                            "artifacts": store.url_for(f"{entry.id}/artifacts/")},
    )
    record.update(entry_id=entry.id, manifest_line=entry.line, wall_seconds=time.perf_counter() - started)
    for item in record["outputs"]["images"]:
        item["uri"] = store.url_for(f"{entry.id}/{item['file']}")
    if record["selection"] and record["selection"]["verdict"] == "selected":
        record["selection"]["uri"] = store.url_for(f"{entry.id}/{record['selection']['file']}")
    if model == "toy":
        record["toy_metrics"] = toy_metrics(entry.target_text, result.images)
    # … the record last, and only once: a concurrent or repeated run never overwrites a finished entry.
    if not store.write_bytes(f"{entry.id}/{RECORD_FILE}", _json(record), if_absent=True):
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
        record = {"schema_version": 1, "status": "failed", "entry_id": r.id, "manifest_line": r.line,
                  "input": {"uri": r.image}, "target_text": r.target_text,
                  "error": {"reason": "invalid_entry", "message": "; ".join(r.problems)}, "wall_seconds": 0.0}
        store.write_bytes(f"{r.id}/{ERROR_FILE}", _json(record))
        records.append(record)
    return records


def _fail(store: Storage, entry: Entry, reason: str, message: str, started: float) -> dict:
    record = {"schema_version": 1, "status": "failed", "entry_id": entry.id, "manifest_line": entry.line,
              "input": {"uri": entry.image}, "target_text": entry.target_text,
              "error": {"reason": reason, "message": message}, "wall_seconds": time.perf_counter() - started}
    store.write_bytes(f"{entry.id}/{ERROR_FILE}", _json(record))
    return record


def batch_report(batch_id: str, records: list[dict], skipped: list[str], seconds: float,
                 earlier: list[dict] | None = None) -> dict:
    """Counts, failures with reasons, and time, for dashboards (`report.json`). `records` are this run's;
    `earlier` the records of entries finished before it (listed with status `finished_before`)."""
    statuses = Counter(r["status"] for r in records)
    rows = [_summary_row(r) for r in records]
    rows += [{**_summary_row(r), "status": "finished_before"} for r in earlier or []]
    verdicts = Counter(row.get("verdict") for row in rows if row["status"] in ("succeeded", "finished_before"))
    edit_seconds = sum(r.get("seconds", {}).get("total", 0.0) for r in records)
    gpu_seconds = sum(r.get("seconds", {}).get("total", 0.0) for r in records if "cuda" in r.get("device", ""))
    return {
        "schema_version": 1, "batch_id": batch_id,
        "counts": {"total": len(records) + len(skipped), "succeeded": statuses["succeeded"],
                   "failed": statuses["failed"], "skipped": len(skipped) + statuses["already_done"],
                   "selected": verdicts["selected"], "needs_review": verdicts["needs_review"]},
        "failures": [{"entry_id": r["entry_id"], "line": r["manifest_line"], **r["error"]}
                     for r in records if r["status"] == "failed"],
        "entries": rows,
        "needs_review": [{"entry_id": row["entry_id"], "reason": row["review_reason"]}
                         for row in rows if row.get("verdict") == "needs_review"],
        "skipped": skipped, "wall_seconds": seconds, "edit_seconds": edit_seconds, "gpu_seconds": gpu_seconds,
    }


def _summary_row(record: dict) -> dict:
    row = {"entry_id": record["entry_id"], "status": record["status"],
           "seconds": round(record.get("wall_seconds", 0.0), 2)}
    if record["status"] in ("succeeded", "already_done"):
        row["etas"] = record["etas"]
        row["contact_sheet"] = record["outputs"]["contact_sheet"]
        selection = record.get("selection") or {}
        row["verdict"] = selection.get("verdict", "not_scored")
        if selection.get("verdict") == "selected":
            row.update(selected_eta=selection["eta"], selected_seed=selection["seed"], selected=selection["uri"],
                       edit_score=selection["scores"]["edit"], fidelity_score=selection["scores"]["fidelity"])
        elif selection:
            row["review_reason"] = selection["reason"]
    else:
        row["reason"] = record["error"]["reason"]
    return row


def report_html(report: dict) -> str:
    """A contact-sheet index page, next to report.json."""
    rows = []
    for row in report["entries"]:
        entry = escape(row["entry_id"])
        if row["status"] in ("succeeded", "finished_before"):
            cell = f'<img src="../../{entry}/{SHEET_FILE}" height="160">'
            if row.get("verdict") == "selected":
                choice = (f'<img src="../../{entry}/{SELECTED_FILE}" height="96" style="border:4px solid #0a3">'
                          f'<br>η={row["selected_eta"]:g} seed={row["selected_seed"]}<br>'
                          f'edit {row["edit_score"]:.3f} · fidelity {row["fidelity_score"]:.2f}')
            else:
                choice = f'<b>needs review</b><br>{escape(row.get("review_reason", row.get("verdict", "")))}'
        else:
            cell, choice = escape(row.get("reason", "")), ""
        rows.append(f"<tr><td>{entry}</td><td>{escape(row['status'])}</td>"
                    f"<td>{row['seconds']}</td><td>{choice}</td><td>{cell}</td></tr>")
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    return (f"<!doctype html><meta charset='utf-8'><title>{escape(report['batch_id'])}</title>"
            f"<h1>Batch {escape(report['batch_id'])}</h1><p>{counts}</p>"
            "<table border=1 cellpadding=4><tr><th>entry</th><th>status</th><th>seconds</th><th>selected</th>"
            "<th>contact sheet</th></tr>"
            + "".join(rows) + "</table>\n")


def write_report(store: Storage, report: dict) -> str:
    prefix = f"_batches/{report['batch_id']}"
    store.write_bytes(f"{prefix}/report.json", _json(report))
    store.write_bytes(f"{prefix}/index.html", report_html(report).encode())
    return store.url_for(f"{prefix}/report.json")


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
