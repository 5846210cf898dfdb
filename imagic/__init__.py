"""imagic-batch: text-based editing of real images with diffusion models (Imagic), run in bulk."""

from imagic.config import PRESETS, EditConfig, make_config
from imagic.editor import Editor
from imagic.images import ImageError, fit_image, load_image
from imagic.models import ModelError, load_pipeline
from imagic.result import EditResult

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "EditConfig", "EditResult", "Editor", "ImageError", "ModelError",
    "fit_image", "load_image", "load_pipeline", "make_config",
]
