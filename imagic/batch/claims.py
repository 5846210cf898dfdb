"""Claims: which run of a batch is editing an entry's attempt folder, until when (a lease).

Numbered claim files written create-if-absent make taking a claim a compare-and-swap: of two runs that race
for the same number, one wins. A lease is short and renewed by a heartbeat while the entry is edited, so a
dead run's entry is free within a lease (`LEASE_S`); one held by a process of this host that no longer
exists is free at once. A claim names its holder (the run), host and process, and carries a token: a
create-if-absent write whose response was lost finds its own claim on retry and knows it as its own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import psutil

from imagic.batch.outputs import CLAIMS, claim_key, json_bytes
from imagic.io.storage import Storage, StorageError

# A claim's lease and its heartbeat: a run that dies without a word holds its entry at most LEASE_S.
LEASE_S, RENEW_EVERY_S = 45.0, 10.0
HOST = socket.gethostname()


def claim(store: Storage, folder: str, holder: str, lease_s: float = LEASE_S) -> dict | None:
    """Take `folder` for `holder` unless another holder's lease is live; None if taken, else the claim.
    The holder of a live lease may claim again: that renews it."""
    number, latest = _latest_claim(store, folder)
    if latest and latest["holder"] != holder and _alive(latest):
        return None
    mine = {"holder": holder, "host": HOST, "pid": os.getpid(), "started": _process_started(),
            "token": uuid.uuid4().hex, "expires_at": time.time() + lease_s}
    key = claim_key(folder, number + 1)
    if store.write_bytes(key, json_bytes(mine), if_absent=True):
        return mine
    try:  # taken, or ours with the response lost: a retried create-if-absent finds what it wrote
        return mine if json.loads(store.read_bytes(key)).get("token") == mine["token"] else None
    except (StorageError, ValueError):
        return None


def live_claim(store: Storage, folder: str) -> dict | None:
    """The folder's latest claim, if its holder may still be at work on it."""
    _, latest = _latest_claim(store, folder)
    return latest if latest and _alive(latest) else None


class Heartbeat:
    """Renews a claim every RENEW_EVERY_S from a thread while an entry is edited (its training, its render and
    its scoring alike), so that a short lease never runs out under a live run."""

    def __init__(self, store: Storage, folder: str, holder: str):
        self.store, self.folder, self.holder = store, folder, holder
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"claim-{folder}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stopped.wait(RENEW_EVERY_S):
            try:
                claim(self.store, self.folder, self.holder)
            except (StorageError, ValueError):
                continue  # a missed beat: the next one renews; the lease outlasts a few


def _alive(latest: dict) -> bool:
    """Whether a claim's holder may still be at work: its lease runs, and it is not a process of this host
    that has ended (or whose pid now belongs to a later process)."""
    if latest.get("expires_at", 0.0) <= time.time():
        return False
    if latest.get("host") != HOST or "pid" not in latest:
        return True  # another machine's process: only its lease says
    try:
        process = psutil.Process(latest["pid"])
        # A zombie has ended: killed, not yet reaped by its parent (a worker that has not noticed yet).
        return (abs(process.create_time() - latest.get("started", 0.0)) < 1.0
                and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:  # no such process
        return False


def _process_started() -> float:
    return psutil.Process().create_time()


def release(store: Storage, folder: str, holder: str) -> None:
    """End `holder`'s lease on `folder` now (an expired claim on top), so a re-run need not wait for it."""
    number, latest = _latest_claim(store, folder)
    if latest and latest["holder"] == holder:
        ended = json_bytes({"holder": holder, "expires_at": 0.0})
        store.write_bytes(claim_key(folder, number + 1), ended, if_absent=True)


def _latest_claim(store: Storage, folder: str) -> tuple[int, dict | None]:
    """(number, content) of the folder's latest claim; (0, None) when it has none."""
    keys = sorted(store.list(f"{folder}/{CLAIMS}/"))
    if not keys:
        return 0, None
    number = int(keys[-1].rsplit("/", 1)[1].split(".")[0])
    try:
        latest = json.loads(store.read_bytes(keys[-1]))
    except ValueError:  # not a claim this code wrote: nobody holds the entry by it
        return number, None
    return number, latest if isinstance(latest, dict) else None
