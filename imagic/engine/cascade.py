"""Imagic on a pixel-space cascade: the paper's Imagen setting (its §3.3 and Appendix B), on DeepFloyd IF.

    image (e.g. 256²) ──downsample──► x0 (64², pixels) ─┐
    target text ──T5──► e_tgt ──(1) optimise, base frozen──► e_opt
                                └─(2a) fine-tune the base on x0 at e_opt
    image, and x0 as the condition ──(2b) fine-tune the super-resolution (SR) model at e_tgt, not e_opt
    (3) render the base at ē = η·e_tgt + (1−η)·e_opt, then upsample every render with the SR model at e_tgt

The base is edited by `CascadeEditor` (imagic/engine/editor.py) as any pixel-space model; the SR model is
a `SuperResolution` here, a second `Denoiser` (the same training loop, LoRA and exact restore) on a UNet
that also takes the low-resolution image — upsampled, noise-augmented at `sr_noise_level` — as three more
input channels, and that level as a class label. A third upscaler (IF-III or SD ×4) is not part of an edit: the paper found fine-tuning it had little
to no effect, so it runs on the outputs as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, IFSuperResolutionPipeline

from imagic.engine.config import EditConfig
from imagic.engine.denoiser import Deadline, Denoiser
from imagic.engine.loading import scheduler_config
from imagic.engine.sampling import ddim_step

SR_PREFIX = "super_resolution."  # the SR model's weights in an edit's delta file
SR_NOISE_STREAM = 1 << 40  # SR noise for seed s comes from seed s + this: never the base's stream for s


class SuperResolution(Denoiser):
    """A cascade's SR model. `condition_on` sets the low-resolution image it upsamples; every prediction
    sees it noise-augmented at `noise_level` with `augmentation` (drawn per training step, per seed)."""

    role = "super_resolution"

    def __init__(self, pipeline: IFSuperResolutionPipeline, deadline: Deadline | None = None):
        super().__init__(pipeline.unet, pipeline.scheduler, pipeline.device, deadline)
        self.pipeline = pipeline
        self.text_encoder = pipeline.text_encoder  # None: the base's T5 conditions both models
        self.image_noising_scheduler = pipeline.image_noising_scheduler
        self.low_res: torch.Tensor | None = None  # (1 or n, 3, H, W): the condition, upsampled to the SR size
        self.augmentation: torch.Tensor | None = None  # its augmentation noise, same shape or one per sample
        self.noise_level = 0
        self.scale = 1  # output size / condition size; the cascade sets it

    def training_shape(self) -> tuple[int, int, int]:
        """The SR model denoises the image (3 channels); its UNet also takes the condition's."""
        side = self.unet.config.sample_size
        return 3, side, side

    def _trace_activation_bytes(self, config, embedding) -> int:
        # One condition image, as training has (a render may have left one per sample); shapes are all it needs.
        kept = self.low_res, self.augmentation
        self.low_res = torch.zeros(1, *self.training_shape(), device=self.device)
        try:
            return super()._trace_activation_bytes(config, embedding)
        finally:
            self.low_res, self.augmentation = kept

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
        return output[:, : x.shape[1]]  # ε; the learned variance is not used (as in `Denoiser.predict`)

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
            guided = self.guided_prediction(x, t, e_tgt.expand(n, -1, -1), uncond.expand(n, -1, -1), guidance)
            x = ddim_step(scheduler, guided, t, x)
            self.deadline.check()
        return x


def sr_config(config: EditConfig) -> EditConfig:
    """The config the SR model trains with: its own steps and lr where set."""
    return config.model_copy(update={
        "finetune_steps": config.finetune_steps if config.sr_finetune_steps is None else config.sr_finetune_steps,
        "finetune_lr": config.sr_finetune_lr or config.finetune_lr})


def split_delta(delta: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An edit's delta file as (the base's weights, the SR model's)."""
    base = {name: value for name, value in delta.items() if not name.startswith(SR_PREFIX)}
    sr = {name.removeprefix(SR_PREFIX): value for name, value in delta.items() if name.startswith(SR_PREFIX)}
    return base, sr


def cascade_memory_needs(base: dict[str, int], sr: dict[str, int], config: EditConfig) -> dict[str, int]:
    """The peak of the two fine-tunes: the base training with the SR model's weights resident, or the SR
    model training with the base's weights (and, for a full fine-tune, its fp32 snapshot) resident; the
    other stage's optimiser state, draws and activations are freed by then."""
    base_kept = 2 * base["unet weights"] if config.finetune_method == "full" else base["unet weights"]  # + fp32 snapshot
    during_base = {**base, "super-resolution unet weights": sr["unet weights"]}
    during_sr = {"unet weights": base_kept, "frozen models": base.get("frozen models", 0),
                 **{f"super-resolution {name}": size for name, size in sr.items()}}
    return max(during_base, during_sr, key=lambda needs: sum(needs.values()))


def _batch(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """`tensor` with n rows: itself, one row expanded, or its rows repeated (a guided batch is two copies)."""
    if tensor.shape[0] == n:
        return tensor
    return tensor.expand(n, -1, -1, -1) if tensor.shape[0] == 1 else tensor.repeat(n // tensor.shape[0], 1, 1, 1)
