"""Scores on every output, from the editing model itself: no other weights, any SD checkpoint.

- **edit**: does the output match the target text more than the input does? The base model (before this
  edit's fine-tune) is a zero-shot classifier (Li et al. 2023, arXiv 2303.16203; Clark & Jaini 2023):
  an image the text describes well is denoised better under the text's embedding. For an image y,
  ``margin(y) = (L(y, e_opt) − L(y, e_tgt)) / (L(y, e_opt) + L(y, e_tgt))`` with L the denoising error
  over a fixed set of (noise, timestep) draws — e_opt stands for the input, which it reconstructs. The
  score is ``margin(output) − margin(input)``: > 0 means the output moved towards the text.
- **fidelity**: is the rest of the input kept? The correlation of the input's and the output's edge maps
  (gradient magnitude, blurred): colour and texture may change, layout may not. 1 = same structure.

Both are deterministic for a given config seed and validated against the toy oracle in
`benchmarks/toy_edits.py` (ROC AUC, README).

Optional, when the config names a CLIP model (`clip_model`: hub id or local directory, loaded once per
process): **clip**, the cosine similarity of the output's and the target text's CLIP embeddings, and
**clip_input**, the same for the output and the input image (the paper's Fig. 9 axes: CLIP score for
editability, an image similarity for fidelity; LPIPS is not offered: its weights are not on a hub).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imagic.engine.sampling import training_target

CLASSIFIER_DRAWS = 16  # (noise, timestep) pairs shared by every image of an edit


@torch.no_grad()
def text_margins(editor, latents: torch.Tensor, e_tgt: torch.Tensor, e_opt: torch.Tensor, seed: int,
                 config=None) -> torch.Tensor:
    """margin(y) for each of the `latents` (n, C, h, w), under the editor's current (base) UNet, in the
    compute precision of `config` (an `EditConfig`; None: fp32)."""
    scheduler = editor.noise_scheduler
    generator = torch.Generator().manual_seed(seed)
    draws = CLASSIFIER_DRAWS
    noise = torch.randn((draws, *latents.shape[1:]), generator=generator).to(latents.device)
    # Evenly spread timesteps (stratified): the classifier needs the coarse and the fine levels.
    steps = scheduler.config.num_train_timesteps
    timesteps = ((torch.arange(draws) + 0.5) * steps / draws).long().to(latents.device)
    errors = {}
    for name, embedding in (("tgt", e_tgt), ("opt", e_opt)):
        per_image = []
        for x0 in latents:
            x0 = x0.unsqueeze(0).expand(draws, -1, -1, -1)
            noisy = scheduler.add_noise(x0, noise, timesteps)
            prediction = (editor.predict(noisy, timesteps, embedding).float() if config is None
                          else editor.predict_in(config, noisy, timesteps, embedding))
            target = training_target(scheduler, x0, noise, timesteps)
            per_image.append(((prediction - target) ** 2).mean())
        errors[name] = torch.stack(per_image)
    return (errors["opt"] - errors["tgt"]) / (errors["opt"] + errors["tgt"])


def edge_map(image: Image.Image, size: int, blur: float = 1 / 32) -> np.ndarray:
    """Gradient magnitude (largest over RGB), blurred by `blur` of the side, at `size`²."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    gy, gx = np.gradient(pixels, axis=(0, 1))
    magnitude = np.sqrt(gx**2 + gy**2).max(axis=-1)
    return _blur(magnitude, sigma=max(1.0, size * blur))


def _blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, edges replicated."""
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(array, radius, mode="edge")
    rows = np.apply_along_axis(np.convolve, 1, padded, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="valid")


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def structure_similarity(a: Image.Image, b: Image.Image, size: int = 64, blur: float = 1 / 32) -> float:
    """Pearson correlation of two images' edge maps; 1 when edges sit in the same places."""
    return _correlation(edge_map(a, size, blur), edge_map(b, size, blur))


def multiscale_structure_similarity(a: Image.Image, b: Image.Image, size: int = 64) -> float:
    """The edge-map correlation at three blurs (1/32, 1/16, 1/8 of the side), averaged: the coarse scales
    forgive a new outline in the same place (a shape edit), every scale sees a move."""
    return float(np.mean([structure_similarity(a, b, size, blur) for blur in (1 / 32, 1 / 16, 1 / 8)]))


def silhouette(image: Image.Image, size: int) -> np.ndarray:
    """How far each pixel's colour is from the image's border (its median): the subject against its
    surroundings, whatever colour either has. Blurred by 1/32 of the side, at `size`²."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.sqrt(((pixels - np.median(border, axis=0)) ** 2).sum(axis=-1))
    return _blur(distance, sigma=max(1.0, size / 32))


def silhouette_similarity(a: Image.Image, b: Image.Image, size: int = 64) -> float:
    """Pearson correlation of the two images' silhouettes: the subject kept where and as large as it was,
    while its colour, its outline's details and the background's colour may change."""
    return _correlation(silhouette(a, size), silhouette(b, size))


FIDELITY_MEASURES = {
    "edges": structure_similarity,
    "edges_coarse": functools.partial(structure_similarity, blur=1 / 8),
    "edges_multiscale": multiscale_structure_similarity,
    "silhouette": silhouette_similarity,
    "silhouette_and_edges": lambda a, b: 0.5 * (silhouette_similarity(a, b) + structure_similarity(a, b)),
}


def score_outputs(editor, input_image, images: dict, e_tgt, e_opt, config,
                  target_text: str = "") -> dict[tuple[float, int], dict]:
    """{(η, seed): {"edit": …, "fidelity": …}} for every output, with the editor's base weights in place."""
    keys = sorted(images)
    pictures = [input_image] + [images[k] for k in keys]
    latents = torch.cat([editor.encode_image(p, config) for p in pictures])
    margins = text_margins(editor, latents, e_tgt.to(editor.device), e_opt.to(editor.device), config.seed,
                           config).cpu()
    scores = {
        key: {
            "edit": round(float(margins[i + 1] - margins[0]), 6),
            "fidelity": round(FIDELITY_MEASURES[config.fidelity](input_image, images[key]), 5),
        }
        for i, key in enumerate(keys)
    }
    if config.clip_model:
        clip = clip_scores(config.clip_model, target_text, input_image, [images[k] for k in keys])
        for key, (text_score, image_score) in zip(keys, clip):
            scores[key].update(clip=round(text_score, 5), clip_input=round(image_score, 5))
    return scores


@functools.lru_cache(maxsize=2)
def _clip(name: str):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(name, use_safetensors=True).eval(), CLIPProcessor.from_pretrained(name)


@torch.no_grad()
def clip_scores(name: str, text: str, input_image: Image.Image, outputs: list[Image.Image]) -> list[tuple[float, float]]:
    """[(cos(output, text), cos(output, input))] with the CLIP model `name`."""
    model, processor = _clip(name)
    pixels = processor(images=[input_image, *outputs], return_tensors="pt")["pixel_values"]
    tokens = processor(text=[text], return_tensors="pt", padding=True)
    images = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    texts = F.normalize(_features(model.get_text_features(**tokens)), dim=-1)
    return [(float(image @ texts[0]), float(image @ images[0])) for image in images[1:]]


def _features(output) -> torch.Tensor:
    # transformers ≥ 5 may return a model output rather than the projected tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output
