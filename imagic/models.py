"""Load a Stable Diffusion pipeline (hub id, local directory or a built-in name) the diffusers way."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from imagic.model_store import ModelError, cache_dir, local_model

logger = logging.getLogger(__name__)

# The components Imagic uses; a safety checker and feature extractor are never loaded.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")


def resolve_model(model: str) -> str:
    """The one place a model name becomes something `from_pretrained` loads: a built-in name (`toy`,
    `tiny`) or an `s3://` prefix (synced once) becomes a local directory; a hub id or path passes through."""
    from imagic import tiny

    if model.startswith("s3://"):
        return local_model(model)
    if model == "toy":
        directory = Path(__file__).parent / "toy" / "model"
        if not (directory / "model_index.json").is_file():
            raise ModelError(f"the toy model is not in this installation ({directory}); "
                             "train it with: python -m imagic.toy.train")
        return str(directory)
    if model == tiny.NAME:
        return str(tiny.ensure_tiny_model(cache_dir() / "models" / tiny.NAME))
    return model


def check_model_dir(path: Path) -> None:
    """Raise ModelError listing what a local diffusers directory lacks."""
    if not path.is_dir():
        raise ModelError(f"{path}: not a directory")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{path}: no model_index.json; expected a diffusers-format Stable Diffusion directory")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{index}: invalid JSON ({err})") from err
    problems = []
    for name in REQUIRED_COMPONENTS:
        if not components.get(name) or components[name][0] is None:
            problems.append(f"model_index.json lists no {name}")
        elif not (path / name).is_dir():
            problems.append(f"missing folder {name}/")
    for name in WEIGHT_COMPONENTS:
        folder = path / name
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
            hint = f" (found {', '.join(found)}: convert them to safetensors)" if found else ""
            problems.append(f"no .safetensors weights in {name}/{hint}")
    if problems:
        raise ModelError(f"{path}: incomplete model: " + "; ".join(problems))


def load_pipeline(model: str, device: str | torch.device = "cpu") -> StableDiffusionPipeline:
    """Load an SD 1.x/2.x pipeline from a hub id, a local directory, an s3:// prefix or a built-in name,
    safetensors only.

    Weights stay in fp32: trained parameters must, and mixed precision is applied as autocast by the editor.
    """
    source = resolve_model(model)
    if Path(source).exists():
        check_model_dir(Path(source))
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            source,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"cannot load model {model!r}: {err}") from err
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
