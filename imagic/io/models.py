"""Model weights from an s3:// prefix, synced once into the local model cache and then loaded like any
diffusers directory. Prefixes are treated as immutable: publish new weights under a new prefix
(`…/sd15/v2/`), as a hub revision would be.
"""

from __future__ import annotations

import json
from pathlib import Path

from imagic.engine.cache import cache_dir
from imagic.io.storage import S3Storage, StorageError

SYNC_MARKER = ".imagic-sync.json"  # written last: its presence means the copy is complete


def local_model(model: str) -> str:
    """An `s3://` prefix becomes a local directory (synced once); anything else is returned as is."""
    if not model.startswith("s3://"):
        return model
    bucket, _, prefix = model[5:].partition("/")
    target = cache_dir() / "models" / "s3" / bucket / prefix.strip("/")
    return str(sync_prefix(S3Storage(bucket, prefix), target))


def sync_prefix(store: S3Storage, target: Path) -> Path:
    if (target / SYNC_MARKER).is_file():
        return target
    source = f"s3://{store.bucket}/{store.prefix}/"
    keys = store.list()
    if not keys:
        raise StorageError(f"{source}: no objects under this prefix")
    for key in keys:
        store.download(key, target / key)
    (target / SYNC_MARKER).write_text(json.dumps({"source": source, "keys": keys}, indent=1))
    return target
