"""imagic-batch: text-based editing of real images with diffusion models (Imagic), run in bulk.

The names below load on first use (PEP 562), so that `imagic --help`, manifest validation and the
flows' planning never import torch.
"""

from importlib import import_module, metadata

try:
    __version__ = metadata.version("imagic-batch")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "PRESETS": "imagic.engine.config", "EditConfig": "imagic.engine.config", "make_config": "imagic.engine.config",
    "CASCADE_PRESETS": "imagic.engine.config", "Editor": "imagic.engine.editor",
    "CascadeEditor": "imagic.engine.editor", "EditResult": "imagic.engine.result", "ImageError": "imagic.engine.images",
    "fit_image": "imagic.engine.images", "load_image": "imagic.engine.images", "ModelError": "imagic.engine.errors",
    "load_pipeline": "imagic.engine.loading", "Cascade": "imagic.engine.loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imagic' has no attribute {name!r}")
