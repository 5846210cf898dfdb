"""A report of the whole batch, for people and dashboards: `report.json`, a contact-sheet index, and the
outputs as a dataset (`edits.parquet`; `metadata.jsonl` for `datasets`' ImageFolder).

Every entry of the manifest is in it: edited now (`succeeded`, `failed`), `finished_before`, `changed`
(its record answers another request and was not redone), `failed_before` (not retried), `already_done`,
`in_progress` (another run of the batch holds it).
"""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from html import escape

from imagic.batch.outputs import (BATCHES, DATASET_FILE, ERROR_FILE, INDEX_FILE, METADATA_FILE, REPORT_FILE,
                                  SCHEMA_VERSION, SHEET_FILE, attempt_folder, batch_key, relative_link, scan)
from imagic.engine.result import SELECTED_FILE
from imagic.io.storage import STALE_PARTIAL_S, Storage, StorageError, compare_and_swap
FINISHED = ("succeeded", "already_done", "finished_before", "changed")  # statuses whose row has outputs
SHARED_INDEX_FILE = "index.shared.html"  # links that open in a browser without credentials (S3: presigned)


def run_records(planned, *, rejected: list[dict], edited: list[bytes], failed_before: list[bytes]) -> Iterator[dict]:
    """Every entry's record, each with the status it has in this run: rejected lines' and this run's edits
    as they are, then those finished before, changed, and failed before (`planned`: the run's `Plan`;
    `edited`, `failed_before`: `read_summaries`). One at a time: the summaries of 100k finished entries are
    parsed as they are reported, never all at once."""
    yield from rejected
    yield from map(json.loads, edited)
    for _, summary in planned.done:
        yield {**json.loads(summary), "status": "finished_before"}
    for _, summary, changes in planned.changed:
        yield {**json.loads(summary), "status": "changed", "changes": changes}
    for summary in failed_before:
        yield {**json.loads(summary), "status": "failed_before"}


def run_info(run_id: str, manifest_uri: str, output_uri: str, model: str, redo: str) -> dict:
    """Which run a report is of; `run_name` also names its kept copy (`runs/<run name>/`)."""
    return {"run_id": run_id, "manifest_uri": manifest_uri, "output_uri": output_uri, "model": model, "redo": redo,
            "run_name": f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{run_id[:8]}"}


def batch_report(batch_id: str, records: Iterable[dict], *, seconds: float, run: dict | None = None,
                 price_per_gpu_hour: float | None = None) -> dict:
    """`records` are every entry's, each with the status it has in this run (see the module doc), read once;
    `run` says which run (id, name, manifest, output, model). With `price_per_gpu_hour`, every row and the
    batch say what their device time cost (`cost`)."""
    rows, failures, edit_seconds, gpu_seconds = [], [], 0.0, 0.0
    device_seconds = {"batch": 0.0, "this_run": 0.0}
    images = 0
    for record in records:
        row = _row(record, price_per_gpu_hour)
        rows.append(row)
        if record["status"] in ("succeeded", "failed", "already_done"):  # edited by this run
            edit_seconds += record.get("seconds", {}).get("total", 0.0)
            gpu_seconds += record.get("seconds", {}).get("total", 0.0) if "cuda" in record.get("device", "") else 0.0
            device_seconds["this_run"] += row["device_seconds"]
        if record["status"] in FINISHED or record["status"] == "failed":
            device_seconds["batch"] += row["device_seconds"]
            images += len(row.get("etas") or []) * len(row.get("seeds") or [])
        if record["status"] == "failed":
            failures.append({"entry_id": record["entry_id"], "line": record["manifest_line"], **record["error"]})
    statuses = Counter(row["status"] for row in rows)
    verdicts = Counter(row.get("verdict") for row in rows if row["status"] in FINISHED)
    return {
        "schema_version": SCHEMA_VERSION, "batch_id": batch_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(run or {}),
        "counts": {"total": len(rows), "succeeded": statuses["succeeded"], "failed": statuses["failed"],
                   "skipped": statuses["finished_before"] + statuses["already_done"] + statuses["failed_before"],
                   "changed": statuses["changed"], "failed_before": statuses["failed_before"],
                   "in_progress": statuses["in_progress"],
                   "selected": verdicts["selected"], "needs_review": verdicts["needs_review"]},
        "failures": failures,
        "changed": [{"entry_id": row["entry_id"], "changes": row["changes"]} for row in rows
                    if row["status"] == "changed"],
        "needs_review": [{"entry_id": row["entry_id"], "reason": row["review_reason"]}
                         for row in rows if row.get("verdict") == "needs_review"],
        "entries": rows,
        "wall_seconds": seconds, "edit_seconds": edit_seconds, "gpu_seconds": gpu_seconds,
        "cost": _cost(device_seconds, images, verdicts["selected"], price_per_gpu_hour),
    }


def _cost(device_seconds: dict[str, float], images: int, selected: int, price: float | None) -> dict:
    """The batch's device time (every entry's own, with its share of its worker's start and model load) and,
    priced, what it cost: in all, this run, per output image and per selected image."""
    cost = {"price_per_gpu_hour": price, "device_seconds": round(device_seconds["batch"], 2),
            "this_run_device_seconds": round(device_seconds["this_run"], 2)}
    if price is not None:
        total = device_seconds["batch"] * price / 3600
        cost.update(total=round(total, 6), this_run=round(device_seconds["this_run"] * price / 3600, 6),
                    per_image=round(total / images, 6) if images else None,
                    per_selected_image=round(total / selected, 6) if selected else None)
    return cost


def _row(record: dict, price_per_gpu_hour: float | None = None) -> dict:
    device_seconds = record.get("device_seconds") or record.get("wall_seconds", 0.0)
    row = {"entry_id": record["entry_id"], "status": record["status"], "attempt": record.get("attempt", 1),
           "folder": record.get("folder") or record["entry_id"], "line": record.get("manifest_line"),
           "target_text": record.get("target_text"), "input": record.get("input", {}).get("uri"),
           "seconds": round(record.get("wall_seconds", 0.0), 2), "device_seconds": round(device_seconds, 2)}
    if price_per_gpu_hour is not None:
        row["cost"] = round(device_seconds * price_per_gpu_hour / 3600, 6)
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


PAGE_ROWS = 1000  # entries per page of the index: 100k contact sheets on one page would sink any browser


def page_name(name: str, page: int) -> str:
    """`index.html`, `index-2.html`, …"""
    stem, _, suffix = name.partition(".")
    return name if page == 1 else f"{stem}-{page}.{suffix}"


def report_pages(report: dict, link, name: str = INDEX_FILE) -> Iterator[tuple[str, str]]:
    """(file name, HTML) of every page of the index, linked to each other."""
    pages = max(1, -(-len(report["entries"]) // PAGE_ROWS))
    for page in range(1, pages + 1):
        yield page_name(name, page), report_html(report, link, page=page, pages=pages, name=name)


def report_html(report: dict, link, *, page: int = 1, pages: int = 1, name: str = INDEX_FILE) -> str:
    """One page of the contact-sheet index. `link(key)` turns a store key into an href (relative, or presigned)."""
    rows = []
    for row in report["entries"][(page - 1) * PAGE_ROWS : page * PAGE_ROWS]:
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
                    f"<td>{status}</td><td>{row['device_seconds']}{_cost_cell(row)}</td><td>{choice}</td>"
                    f"<td>{cell}</td></tr>")
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
    nav = "" if pages == 1 else "<p>pages: " + " ".join(
        f"<b>{n}</b>" if n == page else f'<a href="{page_name(name, n)}">{n}</a>' for n in range(1, pages + 1)) + "</p>"
    title = escape(report["batch_id"])
    return (f"<!doctype html><meta charset='utf-8'><title>{title}</title><h1>Batch {title}</h1>"
            f"<p>run {escape(str(report.get('run_name', '')))} at {escape(report['created_at'])}, "
            f"model {escape(str(report.get('model', '')))}</p><p>{counts}</p>{nav}"
            "<table border=1 cellpadding=4><tr><th>entry</th><th>target text</th><th>status</th><th>device s · cost</th>"
            "<th>selected</th><th>contact sheet</th></tr>" + "".join(rows) + "</table>\n")


def _cost_cell(row: dict) -> str:
    return f" · {row['cost']:.4f}" if row.get("cost") is not None else ""


def dataset_rows(report: dict, records: Iterable[dict], store: Storage) -> Iterator[dict]:
    """One row per entry × η × seed (one row, no image, for a failed entry). `records` in the report's order."""
    for row, record in zip(report["entries"], records, strict=True):
        if record["entry_id"] != row["entry_id"]:
            raise ValueError(f"records out of the report's order: {record['entry_id']} where {row['entry_id']} was")
        base = {"batch_id": report["batch_id"], "entry_id": row["entry_id"], "attempt": row["attempt"],
                "status": row["status"], "input_uri": row["input"], "target_text": row["target_text"],
                "model": row.get("model"), "verdict": row.get("verdict"), "error_reason": row.get("reason")}
        images = record.get("outputs", {}).get("images", []) if row["status"] in FINISHED else []
        share = 1 / max(1, len(images))  # an image's share of its entry's device time and cost
        base.update(device_seconds=row["device_seconds"] * share,
                    cost=row["cost"] * share if row.get("cost") is not None else None)
        if not images:
            yield {**base, "eta": None, "seed": None, "file_name": None, "image_uri": None, "edit": None,
                   "fidelity": None, "selected": False}
        for image in images:
            file_name = f"{row['folder']}/{image['file']}"
            yield {**base, "eta": image["eta"], "seed": image["seed"], "file_name": file_name,
                   "image_uri": store.url_for(file_name), "edit": image.get("edit"), "fidelity": image.get("fidelity"),
                   "selected": (row.get("selected_eta"), row.get("selected_seed")) == (image["eta"], image["seed"])}


_DATASET_SCHEMA = [("batch_id", "string"), ("entry_id", "string"), ("attempt", "int32"), ("status", "string"),
                   ("input_uri", "string"), ("target_text", "string"), ("model", "string"), ("eta", "float64"),
                   ("seed", "int64"), ("file_name", "string"), ("image_uri", "string"), ("edit", "float64"),
                   ("fidelity", "float64"), ("selected", "bool"), ("verdict", "string"), ("error_reason", "string"),
                   ("device_seconds", "float64"), ("cost", "float64")]
_PARQUET_BATCH = 8192  # rows per row group written: the table is never held whole


def parquet_bytes(rows: Iterable[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.type_for_alias(kind)) for name, kind in _DATASET_SCHEMA])
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema) as writer:
        rows = iter(rows)
        while batch := list(itertools.islice(rows, _PARQUET_BATCH)):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return buffer.getvalue()


CURRENT = ("succeeded", "already_done", "finished_before")  # rows whose outputs answer the manifest as it is now
_METADATA_KEYS = ("file_name", "entry_id", "attempt", "input_uri", "target_text", "model", "eta", "seed", "edit",
                  "fidelity", "selected")


class MetadataLines:
    """This batch's lines of the store's ImageFolder metadata, collected from its dataset rows as they pass."""

    def __init__(self):
        # Compact JSON, ≈ 250 bytes an image, each starting with its file name, so that sorting the lines sorts
        # the files: 900k lines at 100k entries, held as bytes and nothing else.
        self.lines: list[bytes] = []
        self.entries: set[str] = set()

    def add(self, row: dict) -> dict:
        self.entries.add(row["entry_id"])
        if row["file_name"] and row["status"] in CURRENT:
            self.lines.append(json.dumps({key: row[key] for key in _METADATA_KEYS}).encode())
        return row

    def merged(self, earlier: bytes | None) -> bytes:
        """Every output that answers its entry's current request (this batch's, plus the `earlier` file's lines
        of entries not in it), sorted, with nothing run-dependent in it: an unchanged batch writes the same
        bytes."""
        kept = list(self.lines)
        for line in io.BytesIO(earlier or b""):  # a line at a time: no second list of 900k lines
            try:
                earlier_row = json.loads(line)
                if earlier_row.get("entry_id") not in self.entries and earlier_row["file_name"]:
                    kept.append(line.rstrip(b"\r\n"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a damaged line: its entry's next batch writes it again
        kept.sort()
        kept.append(b"")  # a newline after the last line too, with no copy of each line to add it
        return b"\n".join(kept)


def update_metadata(store: Storage, rows: Iterable[dict] | MetadataLines) -> None:
    """Merge this batch's rows into the store's `metadata.jsonl` with a compare-and-swap, so that batches
    sharing an output root never lose each other's lines. One file, not one per batch: `datasets`'
    ImageFolder reads a single metadata file per folder."""
    if not isinstance(rows, MetadataLines):
        lines = MetadataLines()
        for row in rows:
            lines.add(row)
        rows = lines
    compare_and_swap(store, METADATA_FILE, rows.merged)


def report_json(report: dict) -> bytes:
    """report.json: indented, one entry a line (100k entries indented field by field would be 3 M lines)."""
    head = json.dumps({key: value for key, value in report.items() if key != "entries"}, indent=2)
    entries = ",\n".join(f"    {json.dumps(row)}" for row in report["entries"])
    return f'{head[:-1].rstrip()},\n  "entries": [\n{entries}\n  ]\n}}\n'.encode()


def write_report(store: Storage, report: dict, records: Iterable[dict]) -> dict[str, str]:
    """Write the report, index and dataset twice: as the batch's latest, and under `runs/<run>/` (kept).
    `records`: the entries' records again, in the report's order (streamed: nothing holds them all).
    Returns where they are (`share_index`: a link a browser opens without credentials)."""
    lines = MetadataLines()
    table = parquet_bytes(lines.add(row) for row in dataset_rows(report, records, store))
    run = report.get("run_name") or report["created_at"].replace(":", "")
    for where in (run, None):
        store.write_bytes(batch_key(report["batch_id"], DATASET_FILE, where), table)
        for name, html in report_pages(report, lambda key, at=batch_key(report["batch_id"], INDEX_FILE, where):
                                       relative_link(at, key)):
            store.write_bytes(batch_key(report["batch_id"], name, where), html.encode())
    del table
    for name, html in report_pages(report, store.share_url, SHARED_INDEX_FILE):
        store.write_bytes(batch_key(report["batch_id"], name, run), html.encode())
    update_metadata(store, lines)
    where = {"report": store.url_for(batch_key(report["batch_id"], REPORT_FILE)),
             "index": store.url_for(batch_key(report["batch_id"], INDEX_FILE)),
             "dataset": store.url_for(batch_key(report["batch_id"], DATASET_FILE)),
             "metadata": store.url_for(METADATA_FILE)}
    report["links"] = dict(where)
    # Not in report.json: a presigned link is a bearer credential that expires; it goes to the Prefect UI.
    where["share_index"] = store.share_url(batch_key(report["batch_id"], SHARED_INDEX_FILE, run))
    data = report_json(report)
    store.write_bytes(batch_key(report["batch_id"], REPORT_FILE, run), data)
    store.write_bytes(batch_key(report["batch_id"], REPORT_FILE), data)  # the latest, last
    for written in (f"{BATCHES}/{report['batch_id']}", METADATA_FILE):  # what runs killed mid-write left
        store.discard_partials(written, older_than_s=STALE_PARTIAL_S)
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
    # The newest run's report, by its key: run names start with the run's UTC time (`run_info`), so one
    # report is read, not every batch's (a nightly job makes a batch a night, each report 100k entries long).
    runs = [k for k in keys if k.startswith(f"{BATCHES}/") and k.count("/") == 4 and k.endswith(f"/{REPORT_FILE}")]
    last = None
    if runs:
        newest = max(runs, key=lambda k: k.split("/")[3])
        report = json.loads(store.read_bytes(newest))
        last = {"uri": store.url_for(batch_key(report["batch_id"], REPORT_FILE)), "batch_id": report["batch_id"],
                "created_at": report["created_at"], "counts": report["counts"]}
    return {"finished": sum(1 for a in attempts.values() if a.state == "finished"), "failed": len(failed),
            "failure_reasons": dict(reasons), "redone": sum(1 for a in attempts.values() if a.latest > 1),
            "last_report": last}
