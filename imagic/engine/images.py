"""Decode any input image to RGB at the model's resolution, or fail naming the input."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Bigger than any photo a user means to edit; smaller than PIL's own bomb limit (~179 MP).
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An input that cannot be turned into an image to edit."""


def load_image(source: str | Path | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `source` (a path or the file's bytes) to an upright RGB image.

    EXIF orientation is applied; transparent images are composited on white; CMYK, palette, grayscale and
    16/32-bit images are converted. Raises `ImageError` naming `name` (default: the path) on anything else.
    """
    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise ImageError(f"{name}: cannot read file ({err.strerror or err})") from err
    if not data:
        raise ImageError(f"{name}: file is empty")

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
                    " (possible decompression bomb)"
                )
            image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageError(f"{name}: image is too large to decode safely ({err})") from err
        except UnidentifiedImageError as err:
            raise ImageError(f"{name}: not an image file PIL can read") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{name}: image data is corrupt or truncated ({err})") from err

    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on a white background."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # High bit depth: scale the actual range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((array - low) * scale).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


FitMode = Literal["keep", "crop", "pad"]


def fit_image(image: Image.Image, resolution: int, mode: FitMode = "crop", multiple: int = 8,
              max_area: int | None = None) -> tuple[Image.Image, dict]:
    """The input at the size the model works at, and what was done to it (for the record, and for
    `unfit_image` to put the outputs back at the input's size).

    `keep`: the input's aspect ratio, scaled to about `max_area` pixels (default `resolution`², the model's
    native area), each side a multiple of `multiple` (the model's factor from pixels to its smallest
    feature map); the few pixels that rounding leaves over are cropped from the centre. `crop`: a centre crop
    to `resolution`² (fills the frame, loses the sides). `pad`: the whole input on a white `resolution`².
    `box` (left, top, right, bottom): for keep and crop, the region of the input the fitted image shows; for
    pad, the region of the fitted image the input fills.
    """
    original = image.size
    if mode == "keep":
        area = max_area or resolution * resolution
        scale = (area / (image.width * image.height)) ** 0.5
        size = tuple(max(multiple, round(side * scale / multiple) * multiple) for side in image.size)
    elif mode in ("crop", "pad"):
        size = (resolution, resolution)
    else:
        raise ValueError(f"fit mode must be 'keep', 'crop' or 'pad', got {mode!r}")
    if mode == "pad":
        fitted = ImageOps.pad(image, size, method=Image.Resampling.LANCZOS, color=(255, 255, 255))
        inner = _contained_size(original, size)
        left, top = round((size[0] - inner[0]) / 2), round((size[1] - inner[1]) / 2)
        box = (left, top, left + inner[0], top + inner[1])
    else:
        fitted = ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)
        box = _centre_box(original, size)
    return fitted, {"mode": mode, "original_size": list(original), "size": list(fitted.size), "box": list(box)}


def unfit_image(output: Image.Image, original: Image.Image, transform: dict) -> Image.Image:
    """An output at the input's size and aspect: what `fit_image` did, undone. keep / crop: the output
    scaled onto the region of the input it shows (pixels that region leaves out stay the input's); pad: the
    region the input filled, scaled back to the input's size."""
    box = tuple(transform["box"])
    if transform["mode"] == "pad":
        return output.crop(box).resize(original.size, Image.Resampling.LANCZOS)
    if box == (0, 0, *original.size):
        return output.resize(original.size, Image.Resampling.LANCZOS)
    restored = original.copy()
    restored.paste(output.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS), box[:2])
    return restored


def _contained_size(original: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The size `ImageOps.contain` (and so `ImageOps.pad`) scales `original` to inside `size`, without resizing."""
    width, height = original
    if width * size[1] > height * size[0]:
        return size[0], round(height / width * size[0])
    if width * size[1] < height * size[0]:
        return round(width / height * size[1]), size[1]
    return size


def _centre_box(original: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre region of `original` with the aspect of `size` (the one `ImageOps.fit` crops), in pixels."""
    width, height = original
    if width * size[1] > height * size[0]:  # wider than the fit: the sides go
        kept = round(height * size[0] / size[1])
        left = (width - kept) // 2
        return left, 0, left + kept, height
    kept = round(width * size[1] / size[0])
    top = (height - kept) // 2
    return 0, top, width, top + kept
