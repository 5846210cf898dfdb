"""Claims: which run of a batch is editing an entry's attempt folder, until when (a lease).

Numbered claim files written create-if-absent make taking a claim a compare-and-swap: of two runs that race
for the same number, one wins. A lease expires, so a crashed run never blocks the entry for good.
"""

from __future__ import annotations

import json
import time

from imagic.batch.outputs import CLAIMS, claim_key, json_bytes
from imagic.io.storage import Storage

# A claim's lease, renewed while the entry trains: a crashed run holds its entry at most this long.
LEASE_S, RENEW_EVERY_S = 600.0, 60.0


def claim(store: Storage, folder: str, holder: str, lease_s: float = LEASE_S) -> dict | None:
    """Take `folder` for `holder` unless another holder's lease is live; None if taken, else the claim.
    The holder of a live lease may claim again: that renews it."""
    number, latest = _latest_claim(store, folder)
    if latest and latest["holder"] != holder and latest["expires_at"] > time.time():
        return None
    mine = {"holder": holder, "expires_at": time.time() + lease_s}
    return mine if store.write_bytes(claim_key(folder, number + 1), json_bytes(mine), if_absent=True) else None


def live_claim(store: Storage, folder: str) -> dict | None:
    """The folder's latest claim, if its lease is live."""
    _, latest = _latest_claim(store, folder)
    return latest if latest and latest["expires_at"] > time.time() else None


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
    return int(keys[-1].rsplit("/", 1)[1].split(".")[0]), json.loads(store.read_bytes(keys[-1]))
