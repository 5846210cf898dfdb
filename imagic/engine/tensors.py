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


def cast_weights(module: torch.nn.Module, dtype: torch.dtype, fp32_copies: dict[int, dict[str, torch.Tensor]]) -> None:
    """`module`'s weights in `dtype`. Before they are first cast down, a host copy of the fp32 weights goes
    into `fp32_copies` (by module), so that casting back to fp32 gives them back bit for bit; a module
    loaded below fp32 (IF's T5 in bf16) stays as it was loaded."""
    current = next(module.parameters()).dtype
    if current == dtype:
        return
    if dtype != torch.float32:
        if current == torch.float32 and id(module) not in fp32_copies:
            fp32_copies[id(module)] = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        module.to(dtype)
    elif id(module) in fp32_copies:
        module.to(dtype)
        module.load_state_dict(fp32_copies[id(module)])
