"""Sampling arithmetic: what a UNet predicts, per the scheduler's `prediction_type` (ε, v or x0) — one owner
for the conversions that training, inversion and the scores share — and the steps renders take."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict: ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or x0, per the checkpoint's config."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def epsilon_from(output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """The noise ε implied by a UNet output of any prediction type, at ᾱ = `alpha_bar`."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":  # v = √ᾱ·ε − √(1−ᾱ)·x0  ⇒  ε = √ᾱ·v + √(1−ᾱ)·x_t
        return alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * sample
    if prediction_type == "sample":
        return (sample - alpha_bar.sqrt() * output) / (1 - alpha_bar).sqrt()
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def ddim_step(scheduler: DDIMScheduler, prediction: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """One DDIM step. Where the schedule clips or thresholds x0 (pixel-space models: IF's dynamic thresholding),
    ε is re-derived from the clipped x0, as GLIDE and Imagen do: mixed with the unclipped ε, a cosine
    schedule's first steps (x0 predicted from almost pure noise) wash every render out to gray."""
    clipped = bool(scheduler.config.thresholding or scheduler.config.clip_sample)
    return scheduler.step(prediction, t, x, use_clipped_model_output=clipped).prev_sample


def ddpm_step_mean(scheduler: DDIMScheduler, prediction: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """The mean of one stochastic step (DDIM with eta = 1: DDPM's posterior on the same timesteps), without its
    noise: what edit-friendly inversion measures its noise maps against, and what its renders add them to."""
    clipped = bool(scheduler.config.thresholding or scheduler.config.clip_sample)
    return scheduler.step(prediction, t, x, eta=1.0, use_clipped_model_output=clipped,
                          variance_noise=torch.zeros_like(x)).prev_sample
