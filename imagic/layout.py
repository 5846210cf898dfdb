"""Where a batch's files live in its store: the one owner of the output layout.

    <entry id>/                 attempt 1 of an entry: images, selected.png, contact sheet, artifacts/,
                                record.json (written last: the attempt is finished) or error.json
    <entry id>/.claims/000001.json   who is editing the attempt, until when (a lease: imagic/batch.py)
    <entry id>@v2/              attempt 2, made when a changed request is redone: earlier attempts
                                are never overwritten, so nothing a user already has disappears
    metadata.jsonl              ImageFolder metadata of every finished output (`datasets` reads the folder)
    _batches/<batch id>/        report.json, index.html, edits.parquet of the latest run of a batch
    _batches/<batch id>/runs/<run>/   the same, for every run (earlier reports are kept)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

RECORD_FILE, ERROR_FILE, SHEET_FILE = "record.json", "error.json", "contact_sheet.png"
METADATA_FILE = "metadata.jsonl"
DATASET_FILE = "edits.parquet"
REPORT_FILE, INDEX_FILE = "report.json", "index.html"
BATCHES = "_batches"
CLAIMS = ".claims"
# Not a character entry ids may hold (imagic/manifest.py), so `a@v2` can never be another entry's id.
ATTEMPT_MARK = "@v"


def attempt_folder(entry_id: str, attempt: int = 1) -> str:
    return entry_id if attempt == 1 else f"{entry_id}{ATTEMPT_MARK}{attempt}"


def parse_folder(folder: str) -> tuple[str, int]:
    """`a@v2` → ("a", 2); `a` → ("a", 1)."""
    entry_id, mark, number = folder.rpartition(ATTEMPT_MARK)
    if mark and number.isdigit() and int(number) >= 2:
        return entry_id, int(number)
    return folder, 1


@dataclass
class Attempts:
    """An entry's attempt folders found in the store: which hold a record, which an error record."""

    finished: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    started: set[int] = field(default_factory=set)

    @property
    def latest(self) -> int:
        return max(self.started | self.finished | self.failed, default=0)

    @property
    def state(self) -> str:
        """Of the latest attempt: `finished` (a record), `failed` (only an error record), or `started`."""
        if self.latest in self.finished:
            return "finished"
        return "failed" if self.latest in self.failed else "started"


def scan(keys: list[str]) -> dict[str, Attempts]:
    """Every entry's attempts, from one listing of the store (not a request per entry)."""
    found: dict[str, Attempts] = defaultdict(Attempts)
    for key in keys:
        folder, slash, name = key.partition("/")
        if not slash or folder == BATCHES:
            continue
        entry_id, attempt = parse_folder(folder)
        attempts = found[entry_id]
        attempts.started.add(attempt)
        if name == RECORD_FILE:
            attempts.finished.add(attempt)
        elif name == ERROR_FILE:
            attempts.failed.add(attempt)
    return dict(found)


def batch_key(batch_id: str, name: str, run: str | None = None) -> str:
    """A batch's file: the latest run's (`run=None`), or one run's."""
    return f"{BATCHES}/{batch_id}/{name}" if run is None else f"{BATCHES}/{batch_id}/runs/{run}/{name}"


def relative_link(from_key: str, to_key: str) -> str:
    """A link from one key's page to another key, that works in a folder and behind S3's HTTP alike."""
    depth = from_key.count("/")
    return "../" * depth + to_key


def claim_key(folder: str, number: int) -> str:
    return f"{folder}/{CLAIMS}/{number:06d}.json"
