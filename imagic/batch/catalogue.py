"""The store's catalogue: for each finished record, the request it answers (as a digest) and its summary, so
that a re-run of a batch — or the next night's batch over a grown dataset — plans from one listing and 256
shard files instead of reading every record (100k records are 1.6 GB; 100k GETs on S3 take minutes).

    _catalogue/<xx>.jsonl   one line per attempt folder whose id hashes to shard xx:
                            {"folder", "record": the record's fingerprint, "input": {"fingerprint", "sha256"},
                             "request": request_digest, "summary": record_summary}

A cache, never the truth: a line is used only while the listing gives its record the same fingerprint, and
only for a request with the same digest; anything else is read from the record, as without a catalogue. So a
missing, stale, hand-edited or half-merged shard costs reads, never a wrong plan. Shards are merged with a
compare-and-swap, so batches that share an output root keep each other's lines.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from imagic.batch.outputs import record_summary, request_digest
from imagic.io.storage import STALE_PARTIAL_S, Storage, StorageError, compare_and_swap

CATALOGUE = "_catalogue"
SHARDS = 256


def shard_key(folder: str) -> str:
    return f"{CATALOGUE}/{hashlib.sha256(folder.encode()).hexdigest()[:2]}.jsonl"


def catalogue_line(folder: str, record_fingerprint: str, record: dict, wanted: dict, *,
                   input_fingerprint: str | None) -> bytes:
    """The line of a finished record judged to answer `wanted` (whose `input_sha256` is the input's, and
    `input_fingerprint` that input's fingerprint)."""
    return json.dumps({"folder": folder, "record": record_fingerprint,
                       "input": {"fingerprint": input_fingerprint, "sha256": wanted["input_sha256"]},
                       "request": request_digest(wanted), "summary": json.loads(record_summary(record))},
                      separators=(",", ":")).encode()


def read_catalogue(store: Storage, keys: list[str]) -> Iterator[dict]:
    """Every line of the shards `keys` (as the listing found them), parsed; lines that do not parse are
    skipped (their records are read instead)."""
    def read(key: str) -> bytes:
        try:
            return store.read_bytes(key)
        except StorageError:  # removed since the listing, or unreadable: its records are read instead
            return b""

    with ThreadPoolExecutor(max_workers=store.read_concurrency) as pool:
        for data in pool.map(read, keys):
            for line in data.splitlines():
                try:
                    parsed = json.loads(line)
                except ValueError:
                    continue
                if isinstance(parsed, dict) and isinstance(parsed.get("summary"), dict):
                    yield parsed


def update_catalogue(store: Storage, lines: list[bytes]) -> None:
    """Merge `lines` into their shards (a line replaces the shard's line of the same folder)."""
    by_shard: dict[str, dict[str, bytes]] = defaultdict(dict)
    for line in lines:
        folder = json.loads(line)["folder"]
        by_shard[shard_key(folder)][folder] = line

    def merge(key: str) -> None:
        ours = by_shard[key]

        def update(earlier: bytes | None) -> bytes:
            kept = {}
            for line in (earlier or b"").splitlines():
                try:
                    kept[json.loads(line)["folder"]] = line
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line: dropped, its record is read instead
            kept.update(ours)
            return b"".join(kept[folder] + b"\n" for folder in sorted(kept))

        try:
            compare_and_swap(store, key, update)
        except StorageError:
            pass  # a cache: the shard's records are read again by the next plan, and their lines written then

    with ThreadPoolExecutor(max_workers=store.read_concurrency) as pool:
        list(pool.map(merge, by_shard))
    store.discard_partials(CATALOGUE, older_than_s=STALE_PARTIAL_S)  # shard writes of runs killed mid-write
