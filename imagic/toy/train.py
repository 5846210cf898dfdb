"""Train the toy text-to-image model from scratch: a Stable-Diffusion-architecture pipeline in diffusers
format (AutoencoderKL + UNet2DConditionModel + CLIPTextModel + tokenizer + DDIM scheduler config).

    python -m imagic.toy.train                                   # the shipped model (~60 min, 2 CPU cores)
    python -m imagic.toy.train --vae-steps 50 --unet-steps 50 --out /tmp/toy   # smoke run, seconds

Two phases, both on scenes drawn on the fly from a seeded generator (deterministic for --seed):
  1. the VAE: 32×32 RGB ↔ 4×8×8 latents (reconstruction + a small KL), then its latent scaling factor;
  2. the UNet and text encoder jointly, ε-prediction on the frozen VAE's latents, captions dropped 10% of
     the time (for classifier-free guidance), EMA weights kept and shipped.
Held-out captions are never trained on; the sample quality on them is measured with the oracle and saved
next to the model with the config and loss curve.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from imagic.toy.tiny import make_clip_tokenizer
from imagic.toy.scenes import BACKGROUNDS, COLORS, SHAPES, Scene, caption, random_scene, render

# Never trained on: each of their attributes (and attribute pairs) still appears in training captions.
HELD_OUT = (("red", "triangle", "gray"), ("green", "circle", "white"), ("blue", "square", "black"),
            ("yellow", "circle", "gray"))
VOCABULARY = ("a", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS)
MAX_TOKENS = 16
DEFAULT_OUT = Path(__file__).parent / "model"


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64
    vae_steps: int = 1000  # phase 1
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    latent_pool: int = 40000  # phase 2 draws batches from this many pre-encoded scenes
    unet_steps: int = 9000  # phase 2
    unet_lr: float = 1e-3  # peak; linear warm-up, then cosine to 10%
    warmup_steps: int = 300
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    eval_samples: int = 240  # oracle-scored samples from held-out captions
    eval_guidance: float = 4.0
    eval_inference_steps: int = 50
    log_every: int = 100


def build_components(seed: int):
    torch.manual_seed(seed)
    tokenizer = make_clip_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    return tokenizer, text_encoder, vae, unet, scheduler


def is_held_out(scene: Scene) -> bool:
    return (scene.color, scene.shape, scene.background) in HELD_OUT


def training_batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, list[str]]:
    """`size` textured scenes (held-out captions redrawn) as (B, 3, 32, 32) in [-1, 1], with captions."""
    scenes = []
    while len(scenes) < size:
        scene = random_scene(rng)
        if not is_held_out(scene):
            scenes.append(scene)
    pixels = np.stack([np.asarray(render(s, rng), np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), [caption(s) for s in scenes]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.unet_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.unet_steps - cfg.warmup_steps)
    return cfg.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: AutoencoderKL, rng: np.random.Generator, cfg: TrainConfig, log: dict) -> None:
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    for step in range(cfg.vae_steps):
        pixels, _ = training_batch(rng, cfg.batch_size)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, pixels) + cfg.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log["vae_loss"].append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            print(f"vae  {step:6d}/{cfg.vae_steps}  loss {loss.item():.5f}  {time.perf_counter() - started:6.0f}s",
                  flush=True)
    vae.requires_grad_(False).eval()
    # SD convention: latents × scaling_factor have unit variance.
    with torch.no_grad():
        pixels, _ = training_batch(np.random.default_rng(cfg.seed + 1), 512)
        std = vae.encode(pixels).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, rng: np.random.Generator, cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """Scenes encoded once by the frozen VAE: phase 2 then costs only the UNet and text encoder."""
    latents, captions = [], []
    for _ in range(0, cfg.latent_pool, 256):
        pixels, batch_captions = training_batch(rng, 256)
        latents.append(vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor)
        captions += batch_captions
    return torch.cat(latents)[: cfg.latent_pool], captions[: cfg.latent_pool]


@torch.no_grad()
def check_vae(vae: AutoencoderKL, cfg: TrainConfig, n: int = 200) -> dict:
    """Oracle accuracy and position error on VAE round trips of clean scenes: the ceiling for any edit."""
    from PIL import Image

    from imagic.toy.oracle import measure

    rng = np.random.default_rng(cfg.seed + 3)
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = torch.from_numpy(np.stack([np.asarray(render(s), np.float32) for s in scenes]) / 127.5 - 1)
    decoded = vae.decode(vae.encode(pixels.permute(0, 3, 1, 2)).latent_dist.mode()).sample
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits, shift = {"color": 0, "shape": 0, "background": 0}, []
    for scene, image in zip(scenes, decoded):
        m = measure(Image.fromarray(image))
        for key in hits:
            hits[key] += getattr(m, key) == getattr(scene, key)
        shift.append(float(np.hypot(m.cx - scene.cx, m.cy - scene.cy)))
    report = {**{k: v / n for k, v in hits.items()}, "mean_shift_px": float(np.mean(shift)),
              "mse": float(F.mse_loss(torch.from_numpy(decoded).float() / 127.5 - 1, pixels))}
    print(f"vae round trip: {report}", flush=True)
    return report


def train_unet(unet, text_encoder, tokenizer, vae, scheduler, rng, cfg: TrainConfig, log: dict):
    """Returns EMA copies of the UNet and the text encoder."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    pool_latents, pool_captions = encode_pool(vae, rng, cfg)
    started = time.perf_counter()
    for step in range(cfg.unet_steps):
        # set lr → batch → forward → backward → clip → step → zero → EMA → log
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        index = rng.integers(0, len(pool_captions), cfg.batch_size)
        latents = pool_latents[torch.from_numpy(index)]  # (B, 4, 8, 8)
        captions = ["" if rng.random() < cfg.caption_dropout else pool_captions[i] for i in index]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer_step(loss, params, optimizer, ema_params, step, cfg)
        log["unet_loss"].append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            recent = np.mean(log["unet_loss"][-cfg.log_every:])
            print(f"unet {step:6d}/{cfg.unet_steps}  loss {recent:.4f}  lr {lr_at(step, cfg):.2e}  "
                  f"{time.perf_counter() - started:6.0f}s", flush=True)
    return ema_unet, ema_text


def optimizer_step(loss, params, optimizer, ema_params, step: int, cfg) -> None:
    """backward → clip → step → zero → EMA (warmed up: the average starts short and grows to `ema_decay`)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)


def evaluate(model: str | Path, cfg, family: str = "single", **overrides) -> dict:
    """Oracle accuracy of samples from held-out captions (and, for contrast, training captions)."""
    from imagic import Editor, make_config
    from imagic.toy.oracle import measure

    editor = Editor.from_pretrained(str(model))
    config = make_config("fast", family, guidance_scale=cfg.eval_guidance, num_inference_steps=cfg.eval_inference_steps,
                         render_batch_size=30, **({"sr_num_inference_steps": cfg.eval_inference_steps}
                                                  if family == "cascade" else {}), **overrides)
    seen = [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS if (c, s, b) not in HELD_OUT][::4]
    report = {}
    for split, combos in (("held_out", HELD_OUT), ("train", seen)):
        per_caption = math.ceil(cfg.eval_samples / len(combos))
        hits = {"color": 0, "shape": 0, "background": 0, "all": 0}
        n = 0
        for color, shape, background in combos:
            text = caption(Scene(shape, color, background, 0, 0, 0))
            e = editor.encode_text(text)
            images = editor.render(e, e, [1.0], list(range(per_caption)), config)
            for image in images.values():
                m = measure(image)
                ok = {"color": m.color == color, "shape": m.shape == shape, "background": m.background == background}
                for key, value in ok.items():
                    hits[key] += value
                hits["all"] += all(ok.values())
                n += 1
        report[split] = {"samples": n, **{k: v / n for k, v in hits.items()}}
        print(f"eval {split}: " + ", ".join(f"{k} {v:.3f}" for k, v in report[split].items() if k != "samples"),
              flush=True)
    return report


def command_line(config_class, description: str, default_out: Path):
    """(config, args) from the command line: one option per config field, and --out, --threads."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = config_class()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--out", type=Path, default=default_out, help="where the model is saved")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return config_class(**{k: getattr(args, k) for k in asdict(defaults)}), args


def main() -> None:
    cfg, args = command_line(TrainConfig, __doc__, DEFAULT_OUT)
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    tokenizer, text_encoder, vae, unet, scheduler = build_components(cfg.seed)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    print(f"parameters: {counts}", flush=True)
    log = {"vae_loss": [], "unet_loss": []}

    # 1. The autoencoder
    train_vae(vae, rng, cfg, log)
    vae_seconds = time.perf_counter() - started
    vae_quality = check_vae(vae, cfg)
    # 2. The denoiser and the text encoder, jointly
    ema_unet, ema_text = train_unet(unet, text_encoder, tokenizer, vae, scheduler, rng, cfg, log)
    train_seconds = time.perf_counter() - started

    # 3. Save in diffusers format, with how it was made
    sampler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet, scheduler=sampler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(args.out, safe_serialization=True)
    quality = evaluate(args.out, cfg)
    save_training_record(args.out, cfg, log, started, parameters=counts, vae_round_trip=vae_quality,
                         quality=quality, seconds={"vae": vae_seconds, "total_training": train_seconds})


def save_training_record(out: Path, cfg, log: dict[str, list[float]], started: float, **info) -> None:
    """training.json (config, held-out captions, threads and `info`) and loss_curve.json beside the model."""
    info = {"config": asdict(cfg), "held_out_captions": [list(c) for c in HELD_OUT],
            "threads": torch.get_num_threads(), **info}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    # Loss curve, averaged per log interval to stay small.
    every = cfg.log_every
    curve = {key: [float(np.mean(v[i:i + every])) for i in range(0, len(v), every)] for key, v in log.items()}
    (out / "loss_curve.json").write_text(json.dumps({"every": every, **curve}) + "\n")
    print(f"saved to {out} in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
