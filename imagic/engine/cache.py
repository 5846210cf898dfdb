"""Where model weights are kept on this machine: built-in models materialised, s3:// models synced."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$IMAGIC_CACHE or ~/.cache/imagic. Read per call, like diffusers' HF_HOME: a cache location belongs
    to the process, not to a batch's settings."""
    return Path(os.environ.get("IMAGIC_CACHE", Path.home() / ".cache" / "imagic"))
