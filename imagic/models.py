"""Load a Stable Diffusion pipeline (hub id, local directory or a built-in name) the diffusers way."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from imagic.model_store import ModelError, cache_dir, local_model

logger = logging.getLogger(__name__)

# The pipelines Imagic edits with, by the class name a checkpoint's model_index.json gives.
PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
# The components Imagic uses; a safety checker, feature extractor or image encoder is never loaded.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# What Stable Diffusion's schedulers are trained with, for the keys a checkpoint's scheduler config leaves
# out: DDIM's own defaults (clip_sample=True, set_alpha_to_one=True, steps_offset=0) wash renders out.
SD_SCHEDULER_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                         "prediction_type": "epsilon", "timestep_spacing": "leading"}


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
    if model in tiny.BUILDERS:
        return str(tiny.ensure_tiny_model(cache_dir() / "models" / model, model))
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
    required = REQUIRED_COMPONENTS + (XL_COMPONENTS if components.get("_class_name") == "StableDiffusionXLPipeline" else ())
    for name in required:
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


def load_pipeline(model: str, device: str | torch.device = "cpu") -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load an SD 1.x/2.x or SDXL pipeline from a hub id, a local directory, an s3:// prefix or a built-in
    name, safetensors only; the pipeline class comes from the checkpoint itself (its model_index.json).

    Weights stay in fp32: trained parameters must, and mixed precision is applied as autocast by the editor.
    """
    source = resolve_model(model)
    if Path(source).exists():
        check_model_dir(Path(source))
    pipeline_class = _pipeline_class(model, source)
    try:
        pipeline = pipeline_class.from_pretrained(
            source,
            use_safetensors=True,
            dtype=torch.float32,
            **({} if pipeline_class is StableDiffusionXLPipeline else
               {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}),
        )
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"cannot load model {model!r}: {err}") from err
    check_pipeline(pipeline, model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _pipeline_class(model: str, source: str) -> type:
    """The checkpoint's pipeline class; an unsupported one (inpainting, pix2pix, IF, …) is a ModelError."""
    try:
        name = DiffusionPipeline.load_config(source).get("_class_name", "StableDiffusionPipeline")
    except (OSError, ValueError):  # not reachable here: let from_pretrained say why
        return StableDiffusionPipeline
    if name not in PIPELINES:
        raise ModelError(f"{model!r} is a {name}; imagic-batch edits with text-to-image checkpoints: "
                         f"{', '.join(PIPELINES)}")
    return PIPELINES[name]


def check_pipeline(pipeline, model: str) -> None:
    """What a loaded pipeline must be for Imagic: a text-to-image UNet on the VAE's latents."""
    unet_channels, latent_channels = pipeline.unet.config.in_channels, pipeline.vae.config.latent_channels
    if unet_channels != latent_channels:
        kind = {9: " (an inpainting UNet?)", 8: " (an instruct-pix2pix UNet?)"}.get(unet_channels, "")
        raise ModelError(f"{model!r}: its UNet takes {unet_channels} input channels{kind}, its VAE makes "
                         f"{latent_channels}; Imagic needs a text-to-image UNet ({latent_channels} channels)")


def scheduler_config(scheduler) -> dict:
    """The checkpoint's scheduler config, with SD's values for the keys its file does not set (diffusers
    lists those in `_use_default_values`) — e.g. a PNDM config has no `clip_sample`, and DDIM's default
    (True) would clip every step's x0."""
    config = dict(scheduler.config)
    unset = set(config.pop("_use_default_values", [])) | (SD_SCHEDULER_DEFAULTS.keys() - config.keys())
    return {**config, **{key: value for key, value in SD_SCHEDULER_DEFAULTS.items() if key in unset}}
