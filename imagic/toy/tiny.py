"""Tiny, randomly initialised pipelines built in code: Stable Diffusion, SDXL and a DeepFloyd IF cascade.

Same classes and directory layout as real checkpoints, so they exercise the real load and edit path
offline in seconds. Their images are noise-like: they test plumbing, not quality.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, IFPipeline,
                       IFSuperResolutionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from tokenizers import pre_tokenizers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel)

from imagic.engine.builtins import CASCADE_FOLDERS, BuiltinModel

VERSION = 2  # bump when the architecture below changes, so caches rebuild
MAX_TOKENS = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def make_clip_tokenizer(words: tuple[str, ...] = (), model_max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over the byte alphabet, with merges that make each of `words` one token.

    Any text tokenizes (character by character); listed words cost one token each.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = [BOS, EOS, *alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        model_max_length=model_max_length,
    )


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon") -> StableDiffusionPipeline:
    """A ~1 M-parameter SD pipeline: 32×32 images, 4×16×16 latents, a 2-layer text encoder."""
    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_xl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL-shaped pipeline: two text encoders (the second with a projection: the pooled embedding),
    a UNet with SDXL's added text/time conditioning, an fp32-only VAE, and SDXL's Euler scheduler config."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_clip_tokenizer()

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden,
        )

    text_encoder = CLIPTextModel(text_config(16))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(32))  # pooled: 32 wide, sequence: 16 + 32
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32, force_upcast=True, scaling_factor=0.13025,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        transformer_layers_per_block=(1, 2),
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


# DeepFloyd IF's noise schedule (its scheduler_config.json): cosine betas, ε with a learned variance range,
# dynamic thresholding of x0 at 1.5.
IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
                    prediction_type="epsilon", variance_type="learned_range", thresholding=True,
                    dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True)


def if_unet(sample_size: int, in_channels: int, text_width: int, super_resolution: bool = False,
            block_out_channels=(32, 64)) -> UNet2DConditionModel:
    """An IF-shaped UNet: pixels in, ε and a variance out (2× channels), T5 states projected in
    (`encoder_hid_dim`) and attention-pooled into the time embedding; the SR one also takes the
    augmentation noise level as a class label."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=6, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=block_out_channels[0], encoder_hid_dim=text_width, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8,
        **(dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu")
           if super_resolution else {}),
    )


def build_tiny_if_pipelines(seed: int = 0) -> tuple[IFPipeline, IFSuperResolutionPipeline]:
    """A tiny DeepFloyd-IF-shaped cascade: a 16×16 pixel base model with a 2-layer T5 encoder, and a
    16→32 super-resolution model that shares the encoder (as IF-II does: it is loaded without one)."""
    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer()  # byte-level: any text (a T5 sentencepiece model needs a file)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, pad_token_id=tokenizer.pad_token_id))
    base = IFPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=if_unet(16, 3, 32), scheduler=DDPMScheduler(**IF_SCHEDULER),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    super_resolution = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=if_unet(32, 6, 32, super_resolution=True),
        scheduler=DDPMScheduler(**IF_SCHEDULER),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    return base, super_resolution


class TinyCascade:
    """Saves a cascade as `base/` and `super_resolution/` beside each other."""

    def __init__(self, seed: int = 0):
        self.stages = build_tiny_if_pipelines(seed)

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        for folder, pipeline in zip(CASCADE_FOLDERS, self.stages):
            pipeline.save_pretrained(Path(directory) / folder, safe_serialization=safe_serialization)


def build_tiny_if_cascade(seed: int = 0) -> TinyCascade:
    return TinyCascade(seed)


# By the name the built-in model table gives (imagic/engine/builtins.py).
BUILDERS = {build.__name__: build for build in (build_tiny_pipeline, build_tiny_xl_pipeline, build_tiny_if_cascade)}


def ensure_tiny_model(directory: Path, builtin: BuiltinModel) -> Path:
    """Build and save the built-in tiny model under `directory` once; later calls reuse it."""
    directory = directory.with_name(f"{directory.name}-v{VERSION}")
    if _complete(directory, builtin):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves a half-written model that looks done.
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        BUILDERS[builtin.builder]().save_pretrained(staging, safe_serialization=True)
        staging.rename(directory)
    except OSError:
        if not _complete(directory, builtin):  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _complete(directory: Path, builtin: BuiltinModel) -> bool:
    return all((directory / folder / "model_index.json").is_file() for folder in builtin.folders)
