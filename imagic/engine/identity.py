"""Which weights a model is: a content hash of its directory, for records and resume by request."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from imagic.engine.builtins import BUILTIN_MODELS, CASCADE_SEPARATOR, shipped_folders, split_revision
from imagic.engine.errors import ModelError

@functools.cache
def model_sha256(path: str) -> str | None:
    """sha256 over every config and weight file (name and bytes); None if `path` is not a local directory.

    Cached per process: a chunk hashes its model once (sha256 ran at 1.2 GB/s on our 2-core CPU, so
    about 4 s for SD 1.5's 4.3 GB of fp32 weights).
    """
    if CASCADE_SEPARATOR in path:  # a cascade: the hash of its stages' hashes
        parts = [model_sha256(part) for part in path.split(CASCADE_SEPARATOR)]
        return None if None in parts else hashlib.sha256(CASCADE_SEPARATOR.join(parts).encode()).hexdigest()
    directory = Path(path) if Path(path).is_dir() else _hub_snapshot(*split_revision(path))
    if directory is None:
        return None
    digest = hashlib.sha256()
    for file in sorted(directory.rglob("*")):
        relative = file.relative_to(directory).as_posix()
        if not file.is_file() or relative.startswith(".") or file.suffix not in (".json", ".txt", ".safetensors"):
            continue
        digest.update(relative.encode() + b"\0")
        with file.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _hub_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot diffusers loaded a hub id (at `revision`) from, if there is one."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not a hub id, or not in the local hub cache
        return None


def known_model_sha256(model: str) -> str | None:
    """The model's hash where it can be had without downloading anything (a local directory, a built-in
    model, a hub id in the local cache); None otherwise. s3:// prefixes are immutable by convention: their
    name says which weights they hold."""
    if model.startswith("s3://"):
        return None
    try:
        if model in BUILTIN_MODELS and (shipped := shipped_folders(BUILTIN_MODELS[model])) is not None:
            return model_sha256(CASCADE_SEPARATOR.join(map(str, shipped)))  # no torch: a parent only plans
        from imagic.engine.loading import resolve_model

        return model_sha256(resolve_model(model))
    except ModelError:
        return None
