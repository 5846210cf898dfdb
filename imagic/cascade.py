"""Imagic on a pixel-space cascade: the paper's Imagen setting (its §3.3 and Appendix B), on DeepFloyd IF.

    image (e.g. 256²) ──downsample──► x0 (64², pixels) ─┐
    target text ──T5──► e_tgt ──(1) optimise, base frozen──► e_opt
                                └─(2a) fine-tune the base on x0 at e_opt
    image, and x0 as the condition ──(2b) fine-tune the super-resolution (SR) model at e_tgt, not e_opt
    (3) render the base at ē = η·e_tgt + (1−η)·e_opt, then upsample every render with the SR model at e_tgt

The base is an `Editor` on a pixel-space pipeline (no VAE); the SR model is a `SuperResolution`, the same
`Editor` machinery (training loop, LoRA, exact restore) on a UNet that also takes the low-resolution image —
upsampled, noise-augmented at `sr_noise_level` — as three more input channels, and that level as a class
label. A third upscaler (IF-III or SD ×4) is not part of an edit: the paper found fine-tuning it had little
to no effect, so it runs on the outputs as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, IFSuperResolutionPipeline
from PIL import Image

from imagic.config import EditConfig
from imagic.editor import Editor, ddim_step, to_images, to_tensor
from imagic.models import Cascade, scheduler_config

SR_PREFIX = "super_resolution."  # the SR model's weights in an edit's delta file
SR_NOISE_STREAM = 1 << 40  # SR noise for seed s comes from seed s + this: never the base's stream for s


class SuperResolution(Editor):
    """A cascade's SR model. `condition_on` sets the low-resolution image it upsamples; every prediction
    sees it noise-augmented at `noise_level` with `augmentation` (drawn per training step, per seed)."""

    def __init__(self, pipeline: IFSuperResolutionPipeline):
        super().__init__(pipeline)
        self.image_noising_scheduler = pipeline.image_noising_scheduler
        self.low_res: torch.Tensor | None = None  # (1 or n, 3, H, W): the condition, upsampled to the SR size
        self.augmentation: torch.Tensor | None = None  # its augmentation noise, same shape or one per sample
        self.noise_level = 0
        self.scale = 1  # output size / condition size; the cascade sets it

    def condition_on(self, low_res: torch.Tensor, size: tuple[int, int], noise_level: int) -> None:
        # As IFSuperResolutionPipeline does: bilinear (corners aligned) to the output size, then noised.
        self.low_res = F.interpolate(low_res, size, mode="bilinear", align_corners=True)
        self.noise_level = noise_level

    def predict(self, x: torch.Tensor, t, embedding: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        level = torch.full((n,), self.noise_level, device=x.device, dtype=torch.long)
        condition = self.image_noising_scheduler.add_noise(_batch(self.low_res, n), _batch(self.augmentation, n), level)
        output = self.unet(torch.cat([x, condition.to(x.dtype)], dim=1), t,
                           encoder_hidden_states=embedding.expand(n, -1, -1), class_labels=level).sample
        return output[:, : x.shape[1]]  # ε; the learned variance is not used (as in `Editor.predict`)

    def training_draws(self, latents, steps, config, generator):
        # Twice the channels: each step's noise for the image, then for the condition's augmentation.
        return super().training_draws(latents.repeat(1, 2, 1, 1), steps, config, generator)

    def denoising_loss(self, latents, embedding, noise, timesteps, config):
        noise, self.augmentation = noise.chunk(2, dim=1)
        return super().denoising_loss(latents, embedding, noise, timesteps, config)

    @torch.no_grad()
    def upsample(self, low_res: torch.Tensor, e_tgt: torch.Tensor, uncond: torch.Tensor, seeds: list[int],
                 config: EditConfig) -> torch.Tensor:
        """Each of `low_res` (n, 3, h, w) upsampled at e_tgt, guided DDIM; seed i's noise for sample i."""
        n, (height, width) = low_res.shape[0], (side * self.scale for side in low_res.shape[-2:])
        self.condition_on(low_res, (height, width), config.sr_noise_level)
        starts, augmentations = [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed + SR_NOISE_STREAM)
            starts.append(torch.randn((1, 3, height, width), generator=generator))
            augmentations.append(torch.randn((1, 3, height, width), generator=generator))
        self.augmentation = torch.cat(augmentations).to(self.device)
        scheduler = DDIMScheduler.from_config(scheduler_config(self.scheduler))
        scheduler.set_timesteps(config.sr_num_inference_steps, device=self.device)
        timesteps, noise = scheduler.timesteps, torch.cat(starts).to(self.device)
        if config.sr_strength < 1:  # the last share of the trajectory, from the upsampled render noised to its start
            timesteps = timesteps[len(timesteps) - max(1, round(config.sr_strength * len(timesteps))):]
            x = scheduler.add_noise(self.low_res, noise, timesteps[:1])
        else:
            x = noise * scheduler.init_noise_sigma
        guidance = config.model_copy(update={"guidance_scale": config.sr_guidance_scale,
                                             "unconditional_model": "finetuned"})
        for t in timesteps:
            guided = self._guided_prediction(x, t, e_tgt.expand(n, -1, -1), uncond.expand(n, -1, -1), guidance)
            x = ddim_step(scheduler, guided, t, x)
            self._check_deadline()
        return x


class CascadeEditor(Editor):
    """Imagic on a `Cascade`: the base model edits, the SR model keeps the edit's detail at full size."""

    has_super_resolution = True

    def __init__(self, cascade: Cascade):
        super().__init__(cascade.base)
        self.pipeline = cascade
        self.super_resolution = SuperResolution(cascade.super_resolution)
        base_size, sr_size = self.unet.config.sample_size, self.super_resolution.unet.config.sample_size
        if sr_size % base_size:
            raise ValueError(f"the SR model's size {sr_size} is not a multiple of the base's {base_size}")
        self.super_resolution.scale = self.scale = sr_size // base_size
        self.resolution = sr_size  # what an edit takes and makes; the base sees it `scale`× smaller
        self.size_multiple *= self.scale

    # ------------------------------------------------------------------ the input at each stage

    @torch.no_grad()
    def encode_image(self, image: Image.Image, config: EditConfig) -> torch.Tensor:
        """The image at the base's size (bicubic, as IF was trained), pixels in [-1, 1]: (1, 3, H/s, W/s)."""
        width, height = (side // self.scale for side in image.size)
        return to_tensor(image.resize((width, height), Image.Resampling.BICUBIC)).to(self.device)

    def stages(self, config: EditConfig, image: Image.Image) -> list[dict]:
        width, height = image.size
        return [
            {"name": "base", "space": "pixel", "size": [width // self.scale, height // self.scale],
             "finetuned_on": "e_opt"},
            {"name": "super_resolution", "space": "pixel", "size": [width, height], "finetuned_on": "e_tgt",
             "rendered_at": "e_tgt", "noise_level": config.sr_noise_level,
             "steps": self._sr_config(config).finetune_steps},
        ]

    # ------------------------------------------------------------------ stage B for both models, stage C

    def finetune_all(self, image, latents, e_tgt, e_opt, config, generator, callback, stats):
        """The base on the input at e_opt (stage B), then the SR model on the input at e_tgt: the paper
        conditions it on the target text, so that it renders the edit's detail, not the input's."""
        delta, losses = super().finetune_all(image, latents, e_tgt, e_opt, config, generator, callback, stats)
        sr = self.super_resolution
        sr._deadline = self._deadline
        with stats.stage("finetune_sr"):
            sr.condition_on(latents, image.size[::-1], config.sr_noise_level)
            sr_callback = None if callback is None else (lambda _, *progress: callback("finetune_sr", *progress))
            sr_delta, losses["finetune_sr"] = sr.finetune(to_tensor(image).to(self.device), e_tgt,
                                                          self._sr_config(config), generator, sr_callback)
        if delta is None:  # a full fine-tune that keeps no delta keeps none for either model
            return None, losses
        return {**delta, **{SR_PREFIX + name: value for name, value in sr_delta.items()}}, losses

    def to_images(self, x: torch.Tensor, keys: list[tuple[float, int]], e_tgt: torch.Tensor,
                  config: EditConfig) -> list[Image.Image]:
        """Each base render upsampled by the SR model at e_tgt (negative: the empty text), seed by seed."""
        self.super_resolution._deadline = self._deadline
        pixels = self.super_resolution.upsample(x.clamp(-1, 1), e_tgt, self.encode_text(""),
                                                [seed for _, seed in keys], config)
        return to_images(pixels)

    def _sr_config(self, config: EditConfig) -> EditConfig:
        """The config the SR model trains with: its own steps and lr where set."""
        return config.model_copy(update={
            "finetune_steps": config.finetune_steps if config.sr_finetune_steps is None else config.sr_finetune_steps,
            "finetune_lr": config.sr_finetune_lr or config.finetune_lr})

    # ------------------------------------------------------------------ weights of both models

    def apply_delta(self, delta: dict[str, torch.Tensor], config: EditConfig) -> None:
        base = {name: value for name, value in delta.items() if not name.startswith(SR_PREFIX)}
        sr = {name.removeprefix(SR_PREFIX): value for name, value in delta.items() if name.startswith(SR_PREFIX)}
        super().apply_delta(base, config)
        self.super_resolution.apply_delta(sr, self._sr_config(config))

    def restore(self) -> None:
        super().restore()
        self.super_resolution.restore()

    def recover(self) -> None:
        super().recover()
        self.super_resolution.recover()

    def check_inputs(self, config: EditConfig, etas, seeds) -> None:
        super().check_inputs(config, etas, seeds)
        self.super_resolution.check_lora_targets(config)

    def memory_needs(self, config: EditConfig) -> dict[str, int]:
        """The peak of the two fine-tunes: the base training with the SR model's weights resident, or the
        SR model training with the base's weights and its snapshot resident (optimiser state is freed)."""
        base, sr = super().memory_needs(config), self.super_resolution.memory_needs(self._sr_config(config))
        base_kept = 2 * base["unet weights"] if config.finetune_method == "full" else base["unet weights"]
        during_base = {**base, "super-resolution unet weights": sr["unet weights"]}
        during_sr = {**base, "unet training": 0, "unet weights": base_kept,
                     "super-resolution unet weights": sr["unet weights"],
                     "super-resolution unet training": sr["unet training"]}
        return max(during_base, during_sr, key=lambda needs: sum(needs.values()))


def _batch(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """`tensor` with n rows: itself, one row expanded, or its rows repeated (a guided batch is two copies)."""
    if tensor.shape[0] == n:
        return tensor
    return tensor.expand(n, -1, -1, -1) if tensor.shape[0] == 1 else tensor.repeat(n // tensor.shape[0], 1, 1, 1)
