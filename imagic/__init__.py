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
    "PRESETS": "imagic.config", "EditConfig": "imagic.config", "make_config": "imagic.config",
    "Editor": "imagic.editor", "EditResult": "imagic.result", "ImageError": "imagic.images",
    "fit_image": "imagic.images", "load_image": "imagic.images", "ModelError": "imagic.model_store",
    "load_pipeline": "imagic.models", "Cascade": "imagic.models", "CascadeEditor": "imagic.cascade",
    "CASCADE_PRESETS": "imagic.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imagic' has no attribute {name!r}")
