"""The plan of a run of a batch: what the store holds for each valid entry, and so what this run does with it.

Resume is by request, not by name: an entry is done only when its latest finished record answers the same
request; otherwise it is `changed`, and redone (into a new attempt folder) only when asked.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from imagic.batch.manifest import Entry
from imagic.batch.outputs import (RECORD_FILE, attempt_folder, record_summary, request, request_changes, scan,
                                  sha256)
from imagic.io.inputs import read_uri
from imagic.io.storage import Storage, StorageError


class Redo(str, Enum):
    """What a re-run of a batch edits again, besides entries never attempted. Each level includes the last."""

    none = "none"  # only entries never attempted
    failed = "failed"  # … and entries whose latest attempt failed (the default: a failure has nothing to lose)
    changed = "changed"  # … and entries whose finished record answers another request (a new attempt folder)
    all = "all"  # … and every finished entry (a new attempt folder each)


_REDO_ORDER = list(Redo)


@dataclass
class Plan:
    """What a run of a batch does with each valid entry."""

    todo: list[Entry] = field(default_factory=list)  # with the attempt folder each writes
    # (entry, its finished record's summary: `record_summary`'s JSON, not the record — 100k records are gigabytes)
    done: list[tuple[Entry, bytes]] = field(default_factory=list)
    changed: list[tuple[Entry, bytes, list[str]]] = field(default_factory=list)  # (entry, summary, what differs)
    failed: list[Entry] = field(default_factory=list)  # failed before and not retried (redo=none)


def plan(entries: list[Entry], store: Storage, *, model: str, model_hash: str | None = None,
         redo: Redo = Redo.failed, rehash_inputs: bool = True) -> Plan:
    """Sort entries by what the store holds for them (one listing; records and inputs read in parallel where
    the store gains from it).

    `rehash_inputs` re-reads the input of every finished entry to compare its content hash with the
    record's: an image replaced under the same URI is `changed`, not silently skipped.
    """
    attempts = scan(store.walk())  # one listing, streamed
    redo_level = _REDO_ORDER.index(Redo(redo))
    result = Plan()
    finished: list[tuple[Entry, int]] = []
    for entry in entries:
        found = attempts.get(entry.id)
        latest = found.latest if found else 0
        if not found or not latest:
            result.todo.append(entry)
        elif found.state == "finished":
            finished.append((entry, latest))
        elif found.state == "failed" and redo_level < _REDO_ORDER.index(Redo.failed):
            result.failed.append(entry)
        else:  # failed, or started and never finished (a killed worker): try again in the same folder
            result.todo.append(entry.model_copy(update={"attempt": latest}))

    def compare(item: tuple[Entry, int]) -> tuple[Entry, int, bytes, list[str]]:
        entry, attempt = item
        record = json.loads(store.read_bytes(f"{attempt_folder(entry.id, attempt)}/{RECORD_FILE}"))
        wanted = request(input_uri=entry.image, target_text=entry.target_text, model=model, model_sha256=model_hash,
                         config=entry.config.model_dump(mode="json"), etas=entry.etas, seeds=entry.seeds,
                         input_sha256=_input_sha256(entry.image) if rehash_inputs else None)
        return entry, attempt, record_summary(record), request_changes(record, wanted)

    with ThreadPoolExecutor(max_workers=store.read_concurrency) as pool:
        for entry, attempt, summary, changes in pool.map(compare, finished):
            redo_this = redo_level >= _REDO_ORDER.index(Redo.all if not changes else Redo.changed)
            if redo_this:
                result.todo.append(entry.model_copy(update={"attempt": attempt + 1}))
            elif changes:
                result.changed.append((entry, summary, changes))
            else:
                result.done.append((entry, summary))
    return result


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
