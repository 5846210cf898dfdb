"""Load what Imagic edits with, the diffusers way, from a hub id, a local directory, an s3:// prefix or a
built-in name: a latent pipeline (SD 1.x/2.x, SDXL), a pixel-space DeepFloyd IF base alone, or a cascade
written `base+super_resolution` (e.g. `DeepFloyd/IF-I-XL-v1.0+DeepFloyd/IF-II-L-v1.0`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (DiffusionPipeline, IFPipeline, IFSuperResolutionPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)

from imagic.engine.builtins import BUILTIN_MODELS, CASCADE_SEPARATOR, BuiltinModel, shipped_folders, split_revision
from imagic.engine.cache import cache_dir
from imagic.engine.errors import ModelError

logger = logging.getLogger(__name__)

# The pipelines Imagic edits with, by the class name a checkpoint's model_index.json gives.
PIPELINES = {"StableDiffusionPipeline": StableDiffusionPipeline, "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
             "IFPipeline": IFPipeline}
SUPER_RESOLUTION = {"IFSuperResolutionPipeline": IFSuperResolutionPipeline}  # a cascade's second stage
# The components Imagic uses, per pipeline class; a safety checker, feature extractor, watermarker or image
# encoder is never loaded, and a super-resolution stage uses the base's text encoder.
REQUIRED_COMPONENTS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2",
                                  "tokenizer_2"),
    "IFPipeline": ("unet", "text_encoder", "tokenizer", "scheduler"),
    "IFSuperResolutionPipeline": ("unet", "scheduler", "image_noising_scheduler"),
}
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
NOT_LOADED = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@dataclass
class Cascade:
    """A pixel-space cascade (Imagen's structure; DeepFloyd IF): a base model at low resolution and a
    super-resolution model that upsamples its output, both conditioned on the base's text encoder."""

    base: IFPipeline
    super_resolution: IFSuperResolutionPipeline

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def name_or_path(self) -> str:
        return CASCADE_SEPARATOR.join(p.name_or_path for p in (self.base, self.super_resolution))
# What Stable Diffusion's schedulers are trained with, for the keys a checkpoint's scheduler config leaves
# out: DDIM's own defaults (clip_sample=True, set_alpha_to_one=True, steps_offset=0) wash renders out.
SD_SCHEDULER_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                         "prediction_type": "epsilon", "timestep_spacing": "leading"}


def resolve_model(model: str) -> str:
    """The one place a model name becomes something `from_pretrained` loads: a built-in name (`toy`,
    `tiny`, `tiny-if`, see `imagic.engine.builtins`) or an `s3://` prefix (synced once) becomes a local
    directory (a cascade: two, joined by `+`); a hub id or path passes through."""
    if CASCADE_SEPARATOR in model:
        return CASCADE_SEPARATOR.join(resolve_model(part) for part in model.split(CASCADE_SEPARATOR))
    if model.startswith("s3://"):
        # Fetching the weights is the storage layer's job; imported here only, so that importing the
        # engine never loads boto3.
        from imagic.io.models import local_model

        return local_model(model)
    if model in BUILTIN_MODELS:
        return CASCADE_SEPARATOR.join(str(folder) for folder in builtin_folders(BUILTIN_MODELS[model]))
    return model


def builtin_folders(builtin: BuiltinModel) -> list[Path]:
    """The pipeline folders of a built-in model: shipped in the package, or built in code once into the cache."""
    if (shipped := shipped_folders(builtin)) is not None:
        return shipped
    from imagic.toy import tiny

    directory = tiny.ensure_tiny_model(cache_dir() / "models" / builtin.name, builtin)
    return [directory / part if part else directory for part in builtin.folders]


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
    required = REQUIRED_COMPONENTS.get(components.get("_class_name"), REQUIRED_COMPONENTS["StableDiffusionPipeline"])
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


def load_pipeline(model: str, device: str | torch.device = "cpu"):
    """Load what `model` names, safetensors only, the pipeline class read from the checkpoint itself (its
    model_index.json): an SD 1.x/2.x, SDXL or IF pipeline, or for `base+super_resolution` a `Cascade`.

    Weights stay in fp32: trained parameters must, and mixed precision is applied as autocast by the editor.
    """
    sources = resolve_model(model).split(CASCADE_SEPARATOR)
    if len(sources) > 2:
        raise ModelError(f"{model!r}: a cascade is two models, base+super_resolution (a third upscaler is not "
                         "edited: run it on the outputs)")
    classes = [_pipeline_class(model, source, PIPELINES if i == 0 else SUPER_RESOLUTION)
               for i, source in enumerate(sources)]
    if len(sources) == 2 and classes[0] is not IFPipeline:
        raise ModelError(f"{model!r}: the base of a cascade must be an IFPipeline, not a {classes[0].__name__}")
    stages = [_from_pretrained(model, sources[0], classes[0], device)]
    if len(sources) == 2:
        stages.append(_from_pretrained(model, sources[1], classes[1], device))
        check_shared_text_encoder(stages[0], stages[1], model)
        return Cascade(*stages)
    return stages[0]


def _from_pretrained(model: str, source: str, pipeline_class: type, device):
    pinned, (source, revision) = source, split_revision(source)
    if Path(source).exists():
        check_model_dir(Path(source))
    extra = {} if pipeline_class is StableDiffusionXLPipeline else dict(NOT_LOADED)
    if pipeline_class is IFSuperResolutionPipeline:  # IF-II takes the base's T5 embeddings: never load T5 twice
        extra.update(text_encoder=None, tokenizer=None, watermarker=None)
    elif pipeline_class is IFPipeline:
        extra.update(watermarker=None)
    dtype = torch.float32
    if pipeline_class is IFPipeline and torch.device(device).type == "cuda":
        # IF's T5-XXL is 4.7 B frozen parameters: read in bf16 (as T5 was trained), never 19 GB of fp32 first.
        dtype = {"text_encoder": torch.bfloat16, "default": torch.float32}
    try:
        pipeline = pipeline_class.from_pretrained(source, revision=revision, use_safetensors=True, dtype=dtype, **extra)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelError(f"cannot load model {model!r}: {err}") from err
    pipeline.register_to_config(_name_or_path=pinned)  # the revision too: which weights, for the record's hash
    check_pipeline(pipeline, model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _pipeline_class(model: str, source: str, supported: dict[str, type]) -> type:
    """The checkpoint's pipeline class; an unsupported one (inpainting, pix2pix, …) is a ModelError."""
    source, revision = split_revision(source)
    try:
        name = DiffusionPipeline.load_config(source, revision=revision).get("_class_name", "StableDiffusionPipeline")
    except (OSError, ValueError):  # not reachable here: let from_pretrained say why
        return next(iter(supported.values()))
    if name in SUPER_RESOLUTION and supported is PIPELINES:
        raise ModelError(f"{model!r} is a super-resolution stage ({name}); name its base first: base+super_resolution")
    if name not in supported:
        raise ModelError(f"{model!r} is a {name}; imagic-batch edits with text-to-image checkpoints "
                         f"({', '.join(PIPELINES)}) and cascades of an IFPipeline with an "
                         f"{', '.join(SUPER_RESOLUTION)}")
    return supported[name]


def check_pipeline(pipeline, model: str) -> None:
    """What a loaded pipeline must be for Imagic: a text-to-image UNet on the VAE's latents (or on pixels)."""
    if isinstance(pipeline, IFSuperResolutionPipeline):
        return
    vae = getattr(pipeline, "vae", None)
    unet_channels, latent_channels = pipeline.unet.config.in_channels, vae.config.latent_channels if vae else 3
    if unet_channels != latent_channels:
        kind = {9: " (an inpainting UNet?)", 8: " (an instruct-pix2pix UNet?)"}.get(unet_channels, "")
        raise ModelError(f"{model!r}: its UNet takes {unet_channels} input channels{kind}, its VAE makes "
                         f"{latent_channels}; Imagic needs a text-to-image UNet ({latent_channels} channels)")
    check_prediction_type(pipeline, model)


def check_prediction_type(pipeline, model: str) -> None:
    """A checkpoint shaped like SD 2.x at 768 px is a v-prediction model; one whose scheduler config does
    not say so would be trained and rendered as ε (SD's default here): noise, not an edit."""
    config = pipeline.scheduler.config
    unset = "prediction_type" not in config or "prediction_type" in config.get("_use_default_values", [])
    unet = pipeline.unet.config
    if unset and unet.cross_attention_dim == 1024 and unet.sample_size == 96:
        raise ModelError(f"{model!r}: an SD 2.x 768 px UNet whose scheduler config sets no prediction_type; the "
                         "768 px SD 2.x models predict v: add \"prediction_type\": \"v_prediction\" to "
                         "scheduler/scheduler_config.json (\"epsilon\" if it predicts the noise)")


def scheduler_config(scheduler) -> dict:
    """The checkpoint's scheduler config, with SD's values for the keys its file does not set (diffusers
    lists those in `_use_default_values`) — e.g. a PNDM config has no `clip_sample`, and DDIM's default
    (True) would clip every step's x0."""
    config = dict(scheduler.config)
    unset = set(config.pop("_use_default_values", [])) | (SD_SCHEDULER_DEFAULTS.keys() - config.keys())
    return {**config, **{key: value for key, value in SD_SCHEDULER_DEFAULTS.items() if key in unset}}


def check_shared_text_encoder(base, super_resolution, model: str) -> None:
    """A cascade's SR stage is conditioned on the base's text embeddings: their widths must agree."""
    width, takes = base.text_encoder.config.d_model, super_resolution.unet.config.encoder_hid_dim
    if takes is not None and takes != width:
        raise ModelError(f"{model!r}: the super-resolution UNet takes {takes}-wide text states; the base's text "
                         f"encoder makes {width}: not stages of one cascade")
