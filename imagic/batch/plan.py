"""The plan of a run of a batch: what the store holds for each valid entry, and so what this run does with it.

Resume is by request, not by name: an entry is done only when its latest finished record answers the same
request; otherwise it is `changed`, and redone (into a new attempt folder) only when asked.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import Enum

from imagic.batch.catalogue import CATALOGUE, catalogue_line, read_catalogue
from imagic.batch.manifest import Entry
from imagic.batch.outputs import (RECORD_FILE, attempt_folder, record_summary, request, request_changes,
                                  request_digest, scan, sha256)
from imagic.io.inputs import input_fingerprints, read_uri
from imagic.io.redaction import redact_uri
from imagic.io.storage import Storage, StorageError


class Redo(str, Enum):
    """What a re-run of a batch edits again, besides entries never attempted. Each level includes the last."""

    none = "none"  # only entries never attempted
    failed = "failed"  # … and entries whose latest attempt failed (the default: a failure has nothing to lose)
    changed = "changed"  # … and entries whose finished record answers another request (a new attempt folder)
    all = "all"  # … and every finished entry (a new attempt folder each)


_REDO_ORDER = list(Redo)


class Plan:
    """What a run of a batch does with each valid entry.

    A plain class on purpose: Prefect walks the dataclasses, lists and models a task returns or takes (looking
    for futures and states to link), and at 100k entries that walk took longer than the plan itself."""

    __slots__ = ("todo", "done", "changed", "failed", "catalogue")

    def __init__(self):
        self.todo: list[Entry] = []  # with the attempt folder each writes
        # (entry, its finished record's summary: `record_summary`'s JSON, not the record — 100k records are GBs)
        self.done: list[tuple[Entry, bytes]] = []
        self.changed: list[tuple[Entry, bytes, list[str]]] = []  # (entry, summary, what differs)
        self.failed: list[Entry] = []  # failed before and not retried (redo=none)
        self.catalogue: list[bytes] = []  # lines for records read now: `update_catalogue` them


def plan(entries: list[Entry], store: Storage, *, model: str, model_hash: str | None = None,
         redo: Redo = Redo.failed, rehash_inputs: bool = True,
         input_allowed: Callable[[str], bool] = lambda uri: True) -> Plan:
    """Sort entries by what the store holds for them, from one listing: a finished record is judged by its
    catalogue line (imagic/batch/catalogue.py) while the listing gives it the same fingerprint, and read only
    when it has none (read in parallel where the store gains from it).

    `rehash_inputs` compares every finished entry's input with the one it was edited from: an image
    replaced under the same URI is `changed`, not silently skipped. An input whose fingerprint (a stat, an S3
    listing, an HTTP HEAD) is the one recorded is not read again; only inputs `input_allowed` are read.
    """
    record_fingerprints: dict[str, str] = {}
    shards: list[str] = []

    def keys() -> Iterator[str]:
        for key, fingerprint in store.listing(name=RECORD_FILE):
            folder, _, name = key.rpartition("/")
            if name == RECORD_FILE and fingerprint is not None:
                record_fingerprints[folder] = fingerprint
            elif key.startswith(f"{CATALOGUE}/"):
                shards.append(key)
            yield key

    attempts = scan(keys())  # one listing, streamed
    redo_level = _REDO_ORDER.index(Redo(redo))
    result = Plan()
    finished: dict[str, tuple[Entry, int]] = {}  # by attempt folder
    for entry in entries:
        found = attempts.get(entry.id)
        latest = found.latest if found else 0
        if not found or not latest:
            result.todo.append(entry)
        elif found.state == "finished":
            finished[attempt_folder(entry.id, latest)] = (entry, latest)
        elif found.state == "failed" and redo_level < _REDO_ORDER.index(Redo.failed):
            result.failed.append(entry)
        else:  # failed, or started and never finished (a killed worker): try again in the same folder
            result.todo.append(entry.model_copy(update={"attempt": latest}))
    del attempts
    wanted = _Requests(model, model_hash)
    now = (input_fingerprints(entry.image for entry, _ in finished.values() if input_allowed(entry.image))
           if rehash_inputs else {})

    # 1. What the catalogue settles: same record, same input, same request
    judged: dict[str, tuple[bytes, list[str]]] = {}  # folder → (summary, changes)
    for line in read_catalogue(store, shards):
        folder = line.get("folder")
        if folder not in finished or folder in judged or line.get("record") != record_fingerprints.get(folder):
            continue
        entry, _ = finished[folder]
        recorded = line.get("input") or {}
        if rehash_inputs and (now.get(entry.image) is None or now[entry.image] != recorded.get("fingerprint")):
            continue  # the input may have changed: compared below, from the record
        if request_digest(wanted(entry, recorded.get("sha256"))) == line.get("request"):
            judged[folder] = (json.dumps(line["summary"], separators=(",", ":")).encode(), [])

    # 2. The rest from their records
    def compare(folder: str) -> tuple[str, bytes, list[str], bytes | None]:
        entry, _ = finished[folder]
        try:
            record = json.loads(store.read_bytes(f"{folder}/{RECORD_FILE}"))
            summary = record_summary(record)
        except (StorageError, ValueError, KeyError, TypeError, AttributeError) as err:
            return folder, _unreadable_summary(entry, folder), [f"record ({type(err).__name__})"], None
        recorded = record.get("input") or {}
        fingerprint = now.get(entry.image)
        if not rehash_inputs:
            input_sha = None
        elif fingerprint is not None and fingerprint == recorded.get("fingerprint"):
            input_sha = recorded.get("sha256")
        else:
            input_sha = _input_sha256(entry.image) if input_allowed(entry.image) else None
        request_now = wanted(entry, input_sha)
        try:
            changes = request_changes(record, request_now)
        except (KeyError, TypeError, AttributeError) as err:
            return folder, summary, [f"record ({type(err).__name__})"], None
        line = None
        if not changes and folder in record_fingerprints and recorded.get("sha256"):
            line = catalogue_line(folder, record_fingerprints[folder], record,
                                  {**request_now, "input_sha256": recorded["sha256"]},
                                  input_fingerprint=fingerprint if input_sha else recorded.get("fingerprint"))
        return folder, summary, changes, line

    unjudged = [folder for folder in finished if folder not in judged]
    with ThreadPoolExecutor(max_workers=store.read_concurrency) as pool:
        for folder, summary, changes, line in pool.map(compare, unjudged):
            judged[folder] = (summary, changes)
            if line is not None:
                result.catalogue.append(line)

    for folder, (entry, attempt) in finished.items():
        summary, changes = judged.pop(folder)
        if redo_level >= _REDO_ORDER.index(Redo.all if not changes else Redo.changed):
            result.todo.append(entry.model_copy(update={"attempt": attempt + 1}))
        elif changes:
            result.changed.append((entry, summary, changes))
        else:
            result.done.append((entry, summary))
    return result


class _Requests:
    """What each entry asks for (`request`), its config dumped once per shared config, not once per entry."""

    def __init__(self, model: str, model_hash: str | None):
        self.model, self.model_hash = model, model_hash
        self._configs: dict[int, tuple[object, dict]] = {}

    def __call__(self, entry: Entry, input_sha256: str | None) -> dict:
        held = self._configs.get(id(entry.config))
        if held is None or held[0] is not entry.config:
            held = self._configs[id(entry.config)] = (entry.config, entry.config.model_dump(mode="json"))
        return request(input_uri=entry.image, target_text=entry.target_text, model=self.model,
                       model_sha256=self.model_hash, config=held[1], etas=entry.etas, seeds=entry.seeds,
                       input_sha256=input_sha256)


def _unreadable_summary(entry: Entry, folder: str) -> bytes:
    """A finished folder whose record cannot be read as one: shown as changed, with what the manifest says."""
    return json.dumps({"status": "changed", "entry_id": entry.id, "attempt": entry.attempt, "folder": folder,
                       "manifest_line": entry.line, "target_text": entry.target_text,
                       "input": {"uri": redact_uri(entry.image)}}, separators=(",", ":")).encode()


def plan_summary(planned: Plan, rejected: list) -> list[tuple[int, str]]:
    """What a run's log says about its plan: (logging level, message) lines."""
    lines = []
    if rejected:
        lines.append((logging.WARNING, f"{len(rejected)} invalid entries:\n"
                      + "\n".join(p for r in rejected for p in r.problems)))
    total = len(planned.todo) + len(planned.done) + len(planned.changed) + len(planned.failed)
    lines.append((logging.INFO, f"{total} entries: {len(planned.todo)} to do, {len(planned.done)} finished before, "
                                f"{len(planned.changed)} changed (not redone: --redo changed), "
                                f"{len(planned.failed)} failed before (not retried)"))
    lines += [(logging.WARNING, f"{entry.id}: changed ({', '.join(changes)}); kept as it is")
              for entry, _, changes in planned.changed]
    return lines


def _input_sha256(uri: str) -> str | None:
    """None when the input cannot be read now: it cannot be compared (and a redo would fail the same way)."""
    try:
        return sha256(read_uri(uri))
    except StorageError:
        return None


def chunk(entries: list[Entry], size: int) -> list[list[Entry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]
