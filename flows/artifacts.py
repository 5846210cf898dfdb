"""What a batch shows in the Prefect UI: a progress bar while it runs; a table, a summary and a contact-sheet
gallery when it ends. Plain functions over the report (imagic/batch/report.py)."""

from __future__ import annotations

from collections import Counter

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.states import Completed, Failed, State

from imagic.batch.outputs import SHEET_FILE

# Above this share of the manifest's entries failing, the flow run ends Failed so that automations alert.
MAX_FAILURE_FRACTION = 0.5
GALLERY_SIZE = 24  # contact sheets shown in the Prefect UI: those that need a look first
SUMMARY_ROWS = 50  # rows of each list in the markdown summary (100k "needs review" lines would be megabytes)
TABLE_ROWS = 500  # entries in the UI's table (100k rows would be the API's problem): failures, then reviews first


class Progress:
    """The share of this run's entries finished, as a progress artifact."""

    def __init__(self, batch_id: str, total: int):
        self.total, self.finished = total, 0
        self.artifact = create_progress_artifact(0.0, key=f"bulk-edit-{batch_id}", description="entries finished")

    def advance(self, count: int) -> None:
        self.finished = min(self.total, self.finished + count)  # entries edited again after a wait count once
        update_progress_artifact(self.artifact, 100.0 * self.finished / max(1, self.total))


def final_state(report: dict, max_failure_fraction: float = MAX_FAILURE_FRACTION) -> State:
    """The final state dashboards show: counts in the message, the report as the result (without its
    entries: 100k rows are in report.json, not in the Prefect API); Failed when more
    than `max_failure_fraction` of the manifest's entries failed in this run, or when entries are held by
    another run that is still alive (they are not done)."""
    counts = report["counts"]
    report = {key: value for key, value in report.items() if key != "entries"}
    message = f"{counts['succeeded']} succeeded, {counts['failed']} failed, {counts['skipped']} skipped"
    if counts.get("changed"):
        message += f", {counts['changed']} changed (not redone: --redo changed)"
    if counts.get("in_progress"):
        message += f", {counts['in_progress']} in progress in another run"
    fraction = counts["failed"] / max(1, counts["total"])
    if counts.get("in_progress"):  # never a success while entries of the manifest are undone
        return Failed(message=f"{message}: {counts['in_progress']} entries are held by a live run of this batch; "
                              "run it again once that run ends, or with --wait-held", data=report)
    if fraction > max_failure_fraction:
        return Failed(message=f"{message}: {counts['failed']} of {counts['total']} entries failed "
                              f"({fraction:.0%} > max_failure_fraction {max_failure_fraction:g})", data=report)
    return Completed(message=message, data=report)


def unreported(error: Exception, outcomes: dict[str, dict]) -> State:
    """The final state of a run whose report could not be written: what its chunks said they did instead
    (local mode; a deployment's chunks say it in their own runs)."""
    done = Counter(row["status"] for row in outcomes.values())
    said = ", ".join(f"{count} {status}" for status, count in sorted(done.items())) or "see its chunk runs"
    return Failed(message=f"the batch's report could not be written ({error}); this run: {said}. Its records "
                          "are in the store: a re-run of the batch writes the report and redoes what failed")


def publish_report(report: dict, links: dict, share_url=None) -> None:
    """Table, summary and contact-sheet artifacts for the Prefect UI. `share_url(key)` makes the links a
    browser opens (presigned for S3); without it, the gallery is left out."""
    key = f"bulk-edit-{report['batch_id']}"
    create_table_artifact(table_rows(report), key=f"{key}-entries",
                          description=f"{min(TABLE_ROWS, len(report['entries']))} of {len(report['entries'])} entries, "
                                      f"failed and needing review first; all in {links['report']}")
    counts = report["counts"]
    lines = [f"# Batch `{report['batch_id']}`", "",
             f"**{counts['succeeded']} succeeded · {counts['failed']} failed · {counts['skipped']} skipped · "
             f"{counts['changed']} changed** of {counts['total']} in {report['wall_seconds']:.0f} s "
             f"(GPU-seconds {report['gpu_seconds']:.0f})",
             _cost_line(report["cost"]),
             f"{counts['selected']} with an output selected automatically · "
             f"**{counts['needs_review']} need review**", "",
             f"Report: `{links['report']}` · [index]({links['share_index']}) · dataset: `{links['dataset']}`"]
    if report["needs_review"]:
        lines += ["", "| entry | needs review because |", "|---|---|"]
        lines += _capped([f"| {r['entry_id']} | {r['reason']} |" for r in report["needs_review"][:SUMMARY_ROWS + 1]],
                         len(report["needs_review"]), links["report"])
    if report["changed"]:
        lines += ["", "| entry | changed since its record (rerun with --redo changed) |", "|---|---|"]
        lines += _capped([f"| {c['entry_id']} | {', '.join(c['changes'])} |"
                          for c in report["changed"][:SUMMARY_ROWS + 1]], len(report["changed"]), links["report"])
    if report["failures"]:
        lines += ["", "| entry | line | reason | message |", "|---|---|---|---|"]
        lines += _capped([f"| {f['entry_id']} | {f['line']} | {f['reason']} | {f['message'][:120]} |"
                          for f in report["failures"][:SUMMARY_ROWS + 1]], len(report["failures"]), links["report"])
    create_markdown_artifact("\n".join(lines), key=f"{key}-summary")
    if share_url is not None:
        create_markdown_artifact(contact_sheet_gallery(report, share_url), key=f"{key}-contact-sheets",
                                 description="contact sheets, those that need review first")


def _capped(rows: list[str], total: int, report_uri: str) -> list[str]:
    """At most SUMMARY_ROWS table rows, then how many more there are and where."""
    if total <= SUMMARY_ROWS:
        return rows
    return rows[:SUMMARY_ROWS] + [f"| … and {total - SUMMARY_ROWS:,} more in `{report_uri}` | |"]


def _cost_line(cost: dict) -> str:
    """The batch's device time and, priced, its cost per image and per selected image."""
    line = f"device time {cost['device_seconds']:.0f} s (this run {cost['this_run_device_seconds']:.0f} s)"
    if cost.get("total") is not None:
        line += f" · cost {cost['total']:.2f} at {cost['price_per_gpu_hour']:g}/GPU-hour"
        if cost.get("per_image") is not None:
            line += f" · {cost['per_image']:.4f} per image"
        if cost.get("per_selected_image") is not None:
            line += f" · {cost['per_selected_image']:.4f} per selected image"
    return line


def table_rows(report: dict) -> list[dict]:
    """At most TABLE_ROWS of the report's rows: the failed ones first, then those that need review."""
    order = {"failed": 0, "not_run": 0, "in_progress": 1}
    rows = sorted(report["entries"], key=lambda row: (order.get(row["status"], 2 if row.get("verdict") == "needs_review"
                                                                               else 3)))
    return rows[:TABLE_ROWS]


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
