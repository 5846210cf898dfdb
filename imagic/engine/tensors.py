"""Images as tensors and back, and what tensors cost: the conversions every stage shares."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image → pixels in [-1, 1], shape (1, 3, H, W)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return pixels.permute(2, 0, 1).unsqueeze(0)


def pixels_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels in [-1, 1], shape (n, 3, H, W) → RGB images."""
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
