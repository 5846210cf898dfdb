"""Train the toy cascade from scratch: DeepFloyd IF's structure on the toy world, in diffusers format.

    python -m imagic.toy.train_cascade                          # the shipped toy-if (~30 min, 2 CPU cores)
    python -m imagic.toy.train_cascade --base-steps 20 --sr-steps 20 --out /tmp/toy-if   # smoke run

A 16×16 pixel-space base model (IF-shaped UNet: ε and a learned variance out, T5 states projected in) with
a small T5 encoder, trained jointly on captions (dropped 10 % of the time, for guidance); then a 16→32
super-resolution model on the frozen encoder's states, its low-res input noise-augmented at a random level
(the class label), as IF-II was trained. Only ε is trained (the variance channels are never used). EMA
weights are shipped; held-out captions are never trained on, and samples from them are scored by the oracle.
Same scenes, vocabulary and held-out split as the latent toy model (`imagic.toy.train`), so edits on the
two can be compared on the same benchmark (`benchmarks/toy_edits.py --model toy-if`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline
from transformers import T5Config, T5EncoderModel

from imagic.engine.builtins import CASCADE_FOLDERS, CASCADE_SEPARATOR
from imagic.toy.tiny import IF_SCHEDULER, if_unet, make_clip_tokenizer
from imagic.toy.train import (MAX_TOKENS, VOCABULARY, command_line, evaluate, optimizer_step, save_training_record,
                              training_batch)

DEFAULT_OUT = Path(__file__).parent / "cascade"
MAX_AUGMENTATION = 500  # SR training draws its low-res noise level from [0, this); renders use 250
# From pure noise this small SR model drifts (mean |error| 0.51 against the truth on training scenes; bilinear
# upsampling: 0.045); from the upsampled render noised to 80 % of the trajectory it is right: render with
# `sr_strength=0.8` (README, the toy cascade).
RENDER_SR_STRENGTH = 0.8


@dataclass
class CascadeTrainConfig:
    seed: int = 0
    base_steps: int = 4000
    base_batch_size: int = 32
    sr_steps: int = 2500
    sr_batch_size: int = 16
    lr: float = 1e-3  # peak; linear warm-up, then cosine to 10 %
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    eval_samples: int = 120
    eval_guidance: float = 4.0
    eval_inference_steps: int = 30
    log_every: int = 100


def lr_at(step: int, steps: int, cfg: CascadeTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def encode(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """T5 states with padding masked, as `Editor.encode_text` computes them at edit time."""
    tokens = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]


def downsample(pixels: torch.Tensor) -> torch.Tensor:
    """32 → 16 px, antialiased bicubic (what `CascadeEditor.encode_image` does with PIL)."""
    return F.interpolate(pixels, scale_factor=0.5, mode="bicubic", antialias=True).clamp(-1, 1)


def train(name: str, unet, trained: list[torch.nn.Module], steps: int, batch_size: int, loss_of, rng, cfg, log):
    """AdamW with warm-up and cosine decay, gradient clipping and EMA copies of `trained`; returns the copies."""
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    emas = [copy.deepcopy(module).requires_grad_(False) for module in trained]
    ema_params = [p for module in emas for p in module.parameters()]
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        pixels, captions = training_batch(rng, batch_size)
        captions = ["" if rng.random() < cfg.caption_dropout else c for c in captions]
        loss = loss_of(pixels, captions)
        optimizer_step(loss, params, optimizer, ema_params, step, cfg)
        log[name].append(loss.item())
        if step % cfg.log_every == 0 or step == steps - 1:
            print(f"{name:4s} {step:6d}/{steps}  loss {np.mean(log[name][-cfg.log_every:]):.4f}  "
                  f"lr {lr_at(step, steps, cfg):.2e}  {time.perf_counter() - started:6.0f}s", flush=True)
    return emas


def main() -> None:
    cfg, args = command_line(CascadeTrainConfig, __doc__, DEFAULT_OUT)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng, generator = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed + 2)
    tokenizer = make_clip_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                           num_heads=4, pad_token_id=tokenizer.pad_token_id))
    base_unet = if_unet(16, 3, 64, block_out_channels=(64, 128))
    sr_unet = if_unet(32, 6, 64, super_resolution=True, block_out_channels=(32, 64))
    scheduler, noising = DDPMScheduler(**IF_SCHEDULER), DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("base_unet", base_unet), ("sr_unet", sr_unet), ("text_encoder", text_encoder))}
    print(f"parameters: {counts}", flush=True)
    log = {"base": [], "sr": []}

    def noised(x0):
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        return scheduler.add_noise(x0, noise, t), noise, t

    # 1. The base model and the text encoder, jointly, on 16 px scenes
    def base_loss(pixels, captions):
        x0 = downsample(pixels)
        noisy, noise, t = noised(x0)
        prediction = base_unet(noisy, t, encoder_hidden_states=encode(text_encoder, tokenizer, captions)).sample
        return F.mse_loss(prediction[:, :3], noise)

    ema_base, ema_text = train("base", base_unet, [base_unet, text_encoder], cfg.base_steps, cfg.base_batch_size,
                               base_loss, rng, cfg, log)
    base_seconds = time.perf_counter() - started

    # 2. The SR model on the frozen encoder: 32 px from 16 px, the condition noise-augmented
    ema_text.eval()

    def sr_loss(pixels, captions):
        with torch.no_grad():
            states = encode(ema_text, tokenizer, captions)
        low = F.interpolate(downsample(pixels), size=pixels.shape[-2:], mode="bilinear", align_corners=True)
        level = torch.randint(0, MAX_AUGMENTATION, (pixels.shape[0],), generator=generator)
        condition = noising.add_noise(low, torch.randn(low.shape, generator=generator), level)
        noisy, noise, t = noised(pixels)
        prediction = sr_unet(torch.cat([noisy, condition], dim=1), t, encoder_hidden_states=states,
                             class_labels=level).sample
        return F.mse_loss(prediction[:, :3], noise)

    (ema_sr,) = train("sr", sr_unet, [sr_unet], cfg.sr_steps, cfg.sr_batch_size, sr_loss, rng, cfg, log)
    train_seconds = time.perf_counter() - started

    # 3. Save as two diffusers pipelines, with how they were made
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    stages = (
        IFPipeline(tokenizer=tokenizer, text_encoder=ema_text, unet=ema_base, scheduler=DDPMScheduler(**IF_SCHEDULER),
                   **none),
        IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=ema_sr, scheduler=DDPMScheduler(**IF_SCHEDULER),
                                  image_noising_scheduler=noising, **none),
    )
    for folder, pipeline in zip(CASCADE_FOLDERS, stages):
        pipeline.save_pretrained(args.out / folder, safe_serialization=True)
    model = CASCADE_SEPARATOR.join(str(args.out / folder) for folder in CASCADE_FOLDERS)
    quality = evaluate(model, cfg, family="cascade", sr_strength=RENDER_SR_STRENGTH)
    save_training_record(args.out, cfg, log, started, parameters=counts, quality=quality,
                         seconds={"base": base_seconds, "total_training": train_seconds})


if __name__ == "__main__":
    main()
