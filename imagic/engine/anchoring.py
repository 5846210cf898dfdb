"""What keeps an edit in place: DDIM inversion of the input, and self-attention maps shared with it.

Imagic renders from seed noise, so the start noise — not the input — decides where the subject lands
(the toy benchmark: 82 % of `fast` edits moved it). Two remedies from the literature, both engine
options (`EditConfig.render_start`, `attention_injection`):

- DDIM inversion (Song et al. 2021; Mokady et al. 2023, arXiv 2211.09794): run DDIM backwards from the
  input's latents under the fine-tuned model at e_opt, and render from there. At η = 0 this gives the
  input back; `inversion_strength` < 1 inverts only part of the way (SDEdit-like, more of the input kept).
- Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023, arXiv 2304.06140; LEDITS++, arXiv
  2311.16711): noise maps extracted so that stochastic sampling reproduces the input exactly at η = 0;
  unlike DDIM inversion each seed draws its own maps, so seeds give different candidates that all hold the
  input's layout. `inversion_strength` < 1 is its skip: fewer steps re-rendered, less geometry free to move.
- Self-attention injection (Prompt-to-Prompt, arXiv 2208.01626; Plug-and-Play, arXiv 2211.12572;
  MasaCtrl, arXiv 2304.08465): render an η = 0 *source* branch beside the edits and, for the first part
  of the trajectory, let every edit attend with the source's queries and keys — the source's spatial
  layout — while keeping its own values, which carry what the text changes (colour, texture, form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from imagic.engine.sampling import ddpm_step_mean, epsilon_from


@torch.no_grad()
def ddim_invert(predict, latents: torch.Tensor, scheduler: DDIMScheduler, num_steps: int) -> list[torch.Tensor]:
    """Deterministic DDIM run backwards from clean `latents` through the last `num_steps` timesteps.

    `scheduler` has had `set_timesteps` called; `predict(x, t)` returns the UNet's output at (x, t).
    Returns the trajectory: item j is the latent at `scheduler.timesteps[-j]` (item 0: `latents`), so the
    last item is where DDIM sampling over the remaining `num_steps` timesteps starts to give `latents`
    back (up to the usual inversion error).
    """
    timesteps = scheduler.timesteps.tolist()  # descending
    alphas = scheduler.alphas_cumprod.to(latents.device)
    prediction_type = scheduler.config.prediction_type
    x = latents
    trajectory = [latents]
    for i in range(1, num_steps + 1):
        t = timesteps[-i]
        alpha_prev = alphas[timesteps[-i + 1]] if i > 1 else scheduler.final_alpha_cumprod.to(latents.device)
        alpha_t = alphas[t]
        # ε is read at the current (less noisy) x for the next timestep: the standard inversion step.
        eps = epsilon_from(predict(x, t).float(), x, alpha_t, prediction_type)
        x0 = (x - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
        x = alpha_t.sqrt() * x0 + (1 - alpha_t).sqrt() * eps
        trajectory.append(x)
    return trajectory


@torch.no_grad()
def ddpm_invert(predict, latents: torch.Tensor, scheduler: DDIMScheduler, num_steps: int,
                generators: list[torch.Generator]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., arXiv 2304.06140; LEDITS++): for each
    generator, noisy latents x_t drawn independently at every one of the last `num_steps` timesteps, and the
    noise each stochastic (DDPM, eta=1) step would need to go from x_t to the drawn x_{t-1}.

    `predict(x, t)` is the guided prediction under the source condition (here e_opt). Sampling from
    `start` with those corrections added to each step's mean gives `latents` back exactly under it; under
    another condition the same noise keeps the input's structure while the text changes what it must.
    Returns (start (n, C, h, w), corrections per step (n, C, h, w), the drawn chain per step ending at x0).
    """
    timesteps = scheduler.timesteps[len(scheduler.timesteps) - num_steps :]
    alphas = scheduler.alphas_cumprod.to(latents.device)
    noise = [torch.randn((*latents.shape[1:], num_steps), generator=g) for g in generators]
    noise = torch.stack(noise).to(latents.device)  # (n, C, h, w, steps): one draw per step, per generator
    x0 = latents.expand(len(generators), -1, -1, -1)
    chain = [alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * noise[..., i] for i, t in enumerate(timesteps)]
    chain.append(x0)
    corrections = []
    for i, t in enumerate(timesteps):
        mean = ddpm_step_mean(scheduler, predict(chain[i], t), t, chain[i])
        corrections.append(chain[i + 1] - mean)  # σ_t·z_t, and the last step's own error (σ = 0 there)
    return chain[0], corrections, chain[1:]


@dataclass
class RenderStart:
    """Where each seed's render begins, and what the anchoring needs on the way."""

    timesteps: torch.Tensor  # the steps rendered: the last ones, when only part of the way is inverted
    latents: dict[int, torch.Tensor]  # seed → start (1, C, h, w)
    corrections: dict[int, list[torch.Tensor]] | None = None  # ddpm_inversion: what each step adds to its mean
    trajectory: dict[int, list[torch.Tensor]] | None = None  # the input's own latent after each step


def render_start(config, scheduler: DDIMScheduler, shape: tuple, seeds, latents: torch.Tensor | None, predict,
                 guided) -> RenderStart:
    """The start of every seed's render, per `config.render_start`. `noise` (the paper): each seed's noise is
    drawn on the CPU from that seed alone, the same for every η and on every device. `inversion`: the DDIM
    inversion of `latents` under `predict(x, t)` (the fine-tuned model at e_opt), so seeds only matter
    through `inversion_noise`. `ddpm_inversion`: per seed, the noise maps that give `latents` back under
    `guided(x, t)` (the guided prediction at e_opt)."""
    timesteps = scheduler.timesteps
    noise = {seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds}
    if config.render_start == "noise":
        return RenderStart(timesteps, {seed: n * scheduler.init_noise_sigma for seed, n in noise.items()})
    if latents is None:
        raise ValueError(f"render_start={config.render_start!r} needs the input's latents")
    steps = max(1, round(config.inversion_strength * len(timesteps)))
    timesteps = timesteps[len(timesteps) - steps :]
    if config.render_start == "inversion":
        trajectory = ddim_invert(predict, latents, scheduler, steps)
        mix = config.inversion_noise  # seeds perturb the inverted start, keeping its variance
        start = {seed: (1 - mix**2) ** 0.5 * trajectory[-1].cpu() + mix * n for seed, n in noise.items()}
        return RenderStart(timesteps, start, trajectory={seed: trajectory[-2::-1] for seed in seeds})
    x, corrections, chain = ddpm_invert(guided, latents, scheduler, steps,
                                        [torch.Generator().manual_seed(int(seed)) for seed in seeds])
    return RenderStart(timesteps, {seed: x[j : j + 1].cpu() for j, seed in enumerate(seeds)},
                       {seed: [c[j : j + 1] for c in corrections] for j, seed in enumerate(seeds)},
                       {seed: [c[j : j + 1] for c in chain] for j, seed in enumerate(seeds)})


@torch.no_grad()
def edit_mask(predict, latents: torch.Tensor, scheduler, e_tgt, e_opt, generator, draws: int = 8,
              strength: float = 0.5, threshold: float = 0.5) -> torch.Tensor:
    """Where the edit happens (DiffEdit, arXiv 2210.11427): the latent pixels whose noise prediction
    differs most between e_tgt and e_opt, over `draws` noisings of the input at `strength`. Returns a
    (1, 1, h, w) mask of 0/1."""
    t = torch.tensor([int(strength * scheduler.config.num_train_timesteps)], device=latents.device)
    noise = torch.randn((draws, *latents.shape[1:]), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents.expand_as(noise), noise, t.expand(draws))
    difference = (predict(noisy, t, e_tgt.expand(draws, -1, -1)) - predict(noisy, t, e_opt.expand(draws, -1, -1)))
    difference = difference.float().abs().mean(dim=(0, 1), keepdim=True)[:1]  # (1, 1, h, w)
    difference = difference / difference.max().clamp_min(1e-12)
    return (difference > threshold).float()


class SourceAttention:
    """Self-attention processor: while `active`, sample i of every group of `group_size` attends with the
    queries and keys of the group's first sample (the source branch); values stay its own."""

    def __init__(self):
        self.active = False
        self.group_size = 1

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, length, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if self.active and self.group_size > 1:
            groups = batch // self.group_size
            source = torch.arange(groups, device=query.device).repeat_interleave(self.group_size) * self.group_size
            query, key = query[source], key[source]
        heads = attn.heads
        split = lambda x: x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class injected_self_attention:  # noqa: N801 (a context manager, used like a function)
    """Install `SourceAttention` on every self-attention layer of `unet`; put the old processors back after."""

    def __init__(self, unet):
        self.unet = unet
        self.processor = SourceAttention()

    def __enter__(self) -> SourceAttention:
        self.saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor(
            {name: self.processor if name.endswith("attn1.processor") else proc for name, proc in self.saved.items()}
        )
        return self.processor

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self.saved)
