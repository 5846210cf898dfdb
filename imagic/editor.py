"""Imagic (Kawar et al., CVPR 2023) on any diffusers Stable Diffusion pipeline (or a pixel-space IF base).

    image ──vae──► latents x0 ─┐            (a pixel-space model: x0 is the image itself)
    target text ──clip──► e_tgt ──(1) optimise, model frozen──► e_opt
                               └─(2) fine-tune the UNet (full or LoRA), e_opt fixed
    (3) render ē = η·e_tgt + (1−η)·e_opt for every (η, seed), classifier-free guided, DDIM

One `Editor` holds one loaded pipeline and edits many images in turn: each edit restores the base
weights exactly when it ends, without reloading them from disk. A cascade (base + super-resolution, the
paper's Imagen setting) is `imagic.cascade.CascadeEditor`; `Editor.from_pretrained` picks the right one.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from imagic.anchoring import SourceAttention, ddim_invert, edit_mask, injected_self_attention
from imagic.config import SR_OPTIONS, EditConfig, check_grid
from imagic.images import fit_image
from imagic.models import Cascade, load_pipeline, scheduler_config
from imagic.prediction import training_target
from imagic.result import EditResult
from imagic.scores import score_outputs
from imagic.selection import select

# (stage, step, total_steps, loss): how the engine reports progress without knowing who listens.
ProgressCallback = Callable[[str, int, int, float], None]
LORA_ADAPTER = "imagic"
LORA_TARGET_EXAMPLES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in")
T5_MAX_TOKENS = 77  # what DeepFloyd IF's pipelines encode (its T5 tokenizer would allow 512)


class Editor:
    """Runs Imagic's three stages on `pipeline` (its weights fp32; see `imagic.models.load_pipeline`)."""

    has_super_resolution = False  # a cascade's editor has one (imagic/cascade.py)

    def __init__(self, pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline):
        if isinstance(pipeline, Cascade):
            raise TypeError("a cascade is edited by imagic.cascade.CascadeEditor (Editor.from_pretrained picks it)")
        self.pipeline, self.scheduler = pipeline, pipeline.scheduler
        self.unet, self.vae = pipeline.unet, getattr(pipeline, "vae", None)  # no VAE: a pixel-space model
        self.text_encoder, self.tokenizer = pipeline.text_encoder, pipeline.tokenizer
        # SDXL: a second text encoder, and a pooled embedding the UNet takes beside the sequence.
        self.text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipeline, "tokenizer_2", None)
        self.is_xl = self.unet.config.addition_embed_type == "text_time"
        self.device = pipeline.device
        for model in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if model is not None:
                model.requires_grad_(False)
        # Training uses the checkpoint's own noise schedule; rendering uses DDIM on the same betas, with
        # the SD-correct values for what the checkpoint's scheduler config leaves out.
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config(pipeline.scheduler))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 1
        self.resolution = self.unet.config.sample_size * self.vae_scale_factor
        # Image sides must divide down to the UNet's smallest feature map.
        self.size_multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        self._base_unet_state: dict[str, torch.Tensor] | None = None  # snapshot for full fine-tunes
        self._unet_modified = False
        self._deadline: float | None = None

    @classmethod
    def from_pretrained(cls, model: str, device: str | torch.device = "cpu") -> Editor:
        """The editor for `model` (see `imagic.models.load_pipeline`): a cascade gets a `CascadeEditor`."""
        pipeline = load_pipeline(model, device)
        if isinstance(pipeline, Cascade):
            from imagic.cascade import CascadeEditor

            return CascadeEditor(pipeline)
        return cls(pipeline)

    # ------------------------------------------------------------------ the whole edit

    def edit(
        self,
        image: Image.Image,
        target_text: str,
        config: EditConfig,
        etas: tuple[float, ...] | list[float],
        seeds: tuple[int, ...] | list[int] = (0,),
        callback: ProgressCallback | None = None,
        deadline: float | None = None,
    ) -> EditResult:
        """Edit `image` towards `target_text`; one image per (η, seed). Base weights are restored after.
        `deadline` (a `time.monotonic()` value): past it, the edit stops with a TimeoutError."""
        # 1. Check inputs
        self.check_inputs(config, etas, seeds)
        self._deadline = deadline
        stats = _StageStats(self.device)
        generator = torch.Generator().manual_seed(config.seed)  # every training draw comes from here
        image, input_transform = fit_image(image.convert("RGB"), self.resolution, config.fit, self.size_multiple,
                                           config.max_area)

        with _tf32(config.tf32 and self.device.type == "cuda"):  # the fast path: TF32 for what runs in fp32
            try:
                # 2. Encode the image once, and the target text
                with stats.stage("encode"):
                    latents = self.encode_image(image, config)
                    e_tgt = self.encode_text(target_text)
                # 3. Stage A: optimise the text embedding, model frozen
                with stats.stage("embedding"):
                    e_opt, embedding_losses = self.optimize_embedding(latents, e_tgt, config, generator, callback)
                # 4. Stage B: fine-tune the model with e_opt fixed (a cascade: its SR model too, at e_tgt)
                delta, finetune_losses = self.finetune_all(image, latents, e_tgt, e_opt, config, generator,
                                                           callback, stats)
                # 5. Stage C: interpolate and render (and η=0 once more: does the edit still hold the input?)
                with stats.stage("render"):
                    check = _check_etas(config, etas)
                    images = self.render(e_tgt, e_opt, [*etas, *check], seeds, config, latents)
            finally:
                self._deadline = None
                self.restore()
        # 6. Score every output with the base model, and choose one
        scores, reconstruction, selection = {}, None, None
        if config.score_outputs:
            with stats.stage("score"):
                scores = score_outputs(self, image, images, e_tgt, e_opt, config, target_text)
                reconstruction = scores[(0.0, seeds[0])]["fidelity"]
                for seed in seeds if check else []:  # the check image is not an output
                    images.pop((0.0, seed))
                    scores.pop((0.0, seed))
                selection = select(scores, reconstruction, config)

        return EditResult(
            target_text=target_text,
            config=config,
            input_image=image,
            images=images,
            e_tgt=e_tgt.cpu(),
            e_opt=e_opt.cpu(),
            delta=delta if (config.finetune_method == "lora" or config.save_full_delta) else None,
            losses={"embedding": embedding_losses, **finetune_losses},
            seconds=stats.seconds,
            peak_memory_bytes=stats.peak_memory_bytes,
            scores=scores,
            reconstruction_fidelity=reconstruction,
            selection=selection,
            input_transform=input_transform,
            stages=self.stages(config, image),
        )

    def stages(self, config: EditConfig, image: Image.Image) -> list[dict]:
        """What each model of the edit saw and was trained on, for the record (a cascade has two)."""
        width, height = (side // self.vae_scale_factor for side in image.size)
        return [{"name": "base", "space": "latent" if self.vae else "pixel", "size": [width, height],
                 "finetuned_on": "e_opt"}]

    def finetune_all(self, image, latents, e_tgt, e_opt, config, generator, callback, stats):
        """Stage B for every model the edit trains: here the one UNet, on the input at e_opt."""
        with stats.stage("finetune"):
            delta, losses = self.finetune(latents, e_opt, config, generator, callback)
        return delta, {"finetune": losses}

    def render_result(
        self, result: EditResult, etas: tuple[float, ...] | list[float], seeds: tuple[int, ...] | list[int]
    ) -> dict[tuple[float, int], Image.Image]:
        """New (η, seed) images from a saved edit, without retraining: apply its delta, render, restore."""
        self.check_inputs(result.config, etas, seeds)
        if result.delta is None:
            raise ValueError(
                "this edit kept no weight delta (a full fine-tune with save_full_delta=False); "
                "re-run it with save_full_delta=True to render it again"
            )
        try:
            latents = self.encode_image(result.input_image, result.config)
            self.apply_delta(result.delta, result.config)
            # The edit's own check image too: batched as the edit batched them, the same η/seed renders (and
            # rounds) exactly alike.
            check = _check_etas(result.config, etas)
            images = self.render(
                result.e_tgt.to(self.device), result.e_opt.to(self.device), [*etas, *check], seeds, result.config,
                latents,
            )
            return {key: image for key, image in images.items() if key[0] not in check}
        finally:
            self.restore()

    def check_inputs(self, config: EditConfig, etas, seeds) -> None:
        """ValueError for a request this pipeline cannot run, before anything is changed."""
        check_grid(list(etas), list(seeds))
        self.check_lora_targets(config)
        if not self.has_super_resolution:
            sr_options = [name for name in SR_OPTIONS if getattr(config, name) != EditConfig.model_fields[name].default]
            if sr_options:
                raise ValueError(f"{', '.join(sr_options)} set, but this model has no super-resolution stage "
                                 "(a cascade is written base+super_resolution)")
        if config.attention_injection > 0 and not any(n.endswith("attn1.processor") for n in self.unet.attn_processors):
            raise ValueError("attention_injection needs separate self-attention layers (attn1); this UNet has none "
                             "(DeepFloyd IF's attention attends to the image and the text at once)")
        if self.device.type != "cuda":
            cuda_only = []
            if config.mixed_precision not in ("no", "auto"):
                cuda_only.append(f"mixed_precision={config.mixed_precision!r}")
            if config.use_8bit_adam:
                cuda_only.append("use_8bit_adam=True")
            if cuda_only:
                raise ValueError(f"{', '.join(cuda_only)} need a CUDA device; this pipeline is on {self.device}")
            return
        needs, total = self.memory_needs(config), torch.cuda.get_device_properties(self.device).total_memory
        if sum(needs.values()) > 0.9 * total:
            parts = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in needs.items() if size)
            advice = ("set use_8bit_adam=true or finetune_method=lora (the default preset)"
                      if config.finetune_method == "full" else "use a GPU with more memory")
            raise ValueError(f"this edit needs about {sum(needs.values()) / 2**30:.1f} GiB besides activations "
                             f"({parts} GiB); this GPU has {total / 2**30:.1f} GiB: {advice}")

    def check_lora_targets(self, config: EditConfig) -> None:
        if config.finetune_method != "lora":
            return
        # peft fails only after it has started wrapping modules: name the targets it would miss first.
        names = [name for name, _ in self.unet.named_modules()]
        missing = [t for t in config.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(f"lora_target_modules {missing} name no module of this UNet "
                             f"(e.g. {', '.join(LORA_TARGET_EXAMPLES)})")

    def memory_needs(self, config: EditConfig) -> dict[str, int]:
        """Bytes an edit holds on the device besides activations, by part: the UNet's fp32 weights, and for
        a full fine-tune its gradients, base snapshot and Adam's two moments (fp32, or 1 byte each with
        8-bit Adam); the frozen models at their dtype. SD 1.5 full: ≈ 17 GB; SDXL full: ≈ 51 GB."""
        weights = _weight_bytes(self.unet)
        training = finetune_bytes(self.unet, config) - weights if config.finetune_method == "full" else 0
        frozen = sum(_weight_bytes(m) for m in (self.vae, self.text_encoder, self.text_encoder_2) if m is not None)
        return {"unet weights": weights, "unet training": training, "frozen models": frozen}

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_image(self, image: Image.Image, config: EditConfig) -> torch.Tensor:
        """RGB image at `self.resolution` → scaled VAE latents, shape (1, C, H/f, W/f); a pixel-space model
        takes the pixels in [-1, 1], shape (1, 3, H, W)."""
        pixels = to_tensor(image).to(self.device)
        if self.vae is None:
            return pixels
        with self._vae_autocast(config):
            latents = self.vae.encode(pixels).latent_dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, text: str) -> torch.Tensor:
        """Text → the embedding Imagic optimises and interpolates, shape (1, L, D): CLIP hidden states; for
        SDXL both encoders' penultimate states side by side, and the pooled embedding packed as one more
        row (so that stage 1 optimises it and stage 3 interpolates it with the sequence; `unet_inputs`
        unpacks it). Too-long text is an error, never silently cut."""
        if self.text_encoder.config.model_type == "t5":  # DeepFloyd IF: T5 states, padding masked as IF does
            tokens = self._tokens(self.tokenizer, text, min(T5_MAX_TOKENS, self.tokenizer.model_max_length))
            return self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0].float()
        if not self.is_xl:
            return self.text_encoder(self._token_ids(self.tokenizer, text))[0].float()
        if text == "" and self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            # SDXL's negative branch: zeros, as its pipeline does (the sequence and the pooled row).
            width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
            return torch.zeros(1, self.tokenizer.model_max_length + 1, width, device=self.device)
        first = self.text_encoder(self._token_ids(self.tokenizer, text), output_hidden_states=True)
        second = self.text_encoder_2(self._token_ids(self.tokenizer_2, text), output_hidden_states=True)
        sequence = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (1, L, D1 + D2)
        pooled = second.text_embeds  # (1, P), P ≤ D1 + D2
        row = F.pad(pooled, (0, sequence.shape[-1] - pooled.shape[-1])).unsqueeze(1)
        return torch.cat([sequence, row], dim=1).float()

    def _token_ids(self, tokenizer, text: str) -> torch.Tensor:
        return self._tokens(tokenizer, text, tokenizer.model_max_length).input_ids

    def _tokens(self, tokenizer, text: str, max_length: int):
        tokens = tokenizer(text, padding="max_length", max_length=max_length, truncation=False, return_tensors="pt")
        if tokens.input_ids.shape[1] > max_length:
            raise ValueError(f"text is {tokens.input_ids.shape[1]} tokens; this model takes at most {max_length}: {text!r}")
        return tokens.to(self.device)

    def unet_inputs(self, x: torch.Tensor, embedding: torch.Tensor) -> dict:
        """The UNet's conditioning for latents `x` (n, C, h, w) and an embedding from `encode_text` (1 or n rows)."""
        embedding = embedding.expand(x.shape[0], -1, -1)
        if not self.is_xl:
            return {"encoder_hidden_states": embedding}
        pooled_dim = self.unet.config.projection_class_embeddings_input_dim - 6 * self.unet.config.addition_time_embed_dim
        height, width = (side * self.vae_scale_factor for side in x.shape[-2:])
        # (original size, crop top-left, target size): the whole image, at the size it is rendered.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=x.dtype, device=x.device)
        return {"encoder_hidden_states": embedding[:, :-1],
                "added_cond_kwargs": {"text_embeds": embedding[:, -1, :pooled_dim],
                                      "time_ids": time_ids.expand(x.shape[0], -1)}}

    def predict(self, x: torch.Tensor, t, embedding: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (ε, v or x0, as its scheduler says) for latents `x` at timestep(s) `t`."""
        output = self.unet(x, t, **self.unet_inputs(x, embedding)).sample
        if output.shape[1] == 2 * x.shape[1]:
            # A learned-variance UNet (DeepFloyd IF: 6 channels for 3) predicts the variance too; the loss and
            # DDIM use the prediction only, as diffusers' own IF fine-tuning scripts do.
            output = output[:, : x.shape[1]]
        return output

    # ------------------------------------------------------------------ stages A and B

    def optimize_embedding(
        self,
        latents: torch.Tensor,
        e_tgt: torch.Tensor,
        config: EditConfig,
        generator: torch.Generator,
        callback: ProgressCallback | None = None,
    ) -> tuple[torch.Tensor, list[float]]:
        """Stage A: Adam on a copy of e_tgt, denoising `latents`; the UNet is frozen (no grads created)."""
        self.unet.requires_grad_(False)
        e_opt = e_tgt.detach().clone().float().requires_grad_(True)
        losses = self._train("embedding", [e_opt], config.embedding_lr, config.embedding_steps, latents, e_opt,
                             config, generator, callback)
        return e_opt.detach(), losses

    def finetune(
        self,
        latents: torch.Tensor,
        e_opt: torch.Tensor,
        config: EditConfig,
        generator: torch.Generator,
        callback: ProgressCallback | None = None,
    ) -> tuple[dict[str, torch.Tensor] | None, list[float]]:
        """Stage B: fit the UNet (all weights, or LoRA on attention projections) to the image at e_opt.

        Leaves the fine-tuned weights in place for rendering and returns (weight delta, losses): LoRA
        weights, or trained − base for a full fine-tune when `save_full_delta` (else None: a UNet-sized
        difference is not computed for nothing). `restore()` undoes it.
        """
        e_opt = e_opt.detach()
        self._unet_modified = True
        if config.finetune_method == "lora":
            self._add_lora(config)
            params = [p for p in self.unet.parameters() if p.requires_grad]
        else:
            base = self._base_state()
            self.unet.requires_grad_(True)
            params = list(self.unet.parameters())
        losses = self._train("finetune", params, config.finetune_lr, config.finetune_steps, latents, e_opt, config,
                             generator, callback)
        self.unet.requires_grad_(False)

        if config.finetune_method == "lora":
            return {name: p.detach().cpu().clone() for name, p in self.unet.named_parameters() if "lora_" in name}, losses
        if not config.save_full_delta:
            return None, losses
        delta = {name: (p.detach() - base[name]).cpu() for name, p in self.unet.named_parameters()}
        # Render from base + delta, exactly what a later render-only run reconstructs.
        self._apply_unet_delta(delta, config)
        return delta, losses

    def training_draws(self, latents: torch.Tensor, steps: int, config: EditConfig,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Every step's noise and timesteps, drawn up front from the seeded CPU generator in the order the
        steps use them (so results do not depend on the device), then moved to the device at once."""
        batch, shape = config.train_batch_size, latents.shape[1:]
        noises, timesteps = [], []
        for _ in range(steps):
            noises.append(torch.randn((batch, *shape), generator=generator))
            timesteps.append(torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch,),
                                           generator=generator))
        return torch.stack(noises).to(self.device), torch.stack(timesteps).to(self.device)

    def denoising_loss(self, latents: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor,
                       timesteps: torch.Tensor, config: EditConfig) -> torch.Tensor:
        """MSE between the UNet's prediction and its target for one step's draws (noise (B, C, h, w), t (B,))."""
        x0 = latents.expand(noise.shape)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        target = training_target(self.noise_scheduler, x0, noise, timesteps)
        with self._autocast(config):
            prediction = self.predict(noisy, timesteps, embedding)
        return F.mse_loss(prediction.float(), target.float())

    def _train(self, stage, params, lr, steps, latents, embedding, config: EditConfig, generator, callback) -> list[float]:
        """Adam on `params` for `steps` steps of the denoising loss; returns the per-step losses.

        Losses stay on the device and are read back every `loss_readback_steps` steps: a read waits for
        the GPU, and nothing else in the loop does."""
        if steps == 0:
            return []
        noises, timesteps = self.training_draws(latents, steps, config, generator)
        optimizer = _adam(params, lr, config, self.device)
        scaler = torch.amp.GradScaler("cuda", enabled=self._precision(config) == "fp16")
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        losses: list[torch.Tensor] = []
        try:
            for step in range(1, steps + 1):
                loss = self.denoising_loss(latents, embedding, noises[step - 1], timesteps[step - 1], config)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                self._check_deadline()
                if callback is not None and (step % config.loss_readback_steps == 0 or step == steps):
                    callback(stage, step, steps, losses[-1].item())
        finally:
            if config.gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()
        return torch.stack(losses).tolist()

    # ------------------------------------------------------------------ stage C

    @torch.no_grad()
    def render(
        self,
        e_tgt: torch.Tensor,
        e_opt: torch.Tensor,
        etas: tuple[float, ...] | list[float],
        seeds: tuple[int, ...] | list[int],
        config: EditConfig,
        latents: torch.Tensor | None = None,
    ) -> dict[tuple[float, int], Image.Image]:
        """Stage C: one image per (η, seed) of ē = η·e_tgt + (1−η)·e_opt, in batched guided DDIM calls.

        `render_start="noise"` (the paper): each seed's start noise is drawn on the CPU from that seed
        alone, the same for every η and on every device. `"inversion"`: every image starts from the DDIM
        inversion of the input `latents` (see `imagic.anchoring`), so seeds only matter through
        `inversion_noise`. The anchoring options act on the denoising steps in the order they run.
        """
        # The negative branch of guidance: the empty text (the paper), or e_opt — the input itself, so that
        # guidance pushes only along what the text changes (negative-prompt inversion, arXiv 2305.16807).
        uncond = self.encode_text("") if config.negative_embedding == "empty" else e_opt  # (1, L, D)
        scheduler = DDIMScheduler.from_config(scheduler_config(self.scheduler))
        scheduler.set_timesteps(config.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        side = self.unet.config.sample_size
        shape = (1, self.unet.config.in_channels, *(latents.shape[-2:] if latents is not None else (side, side)))
        start_noise = {seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds}
        if config.render_start == "inversion":
            if latents is None:
                raise ValueError("render_start='inversion' needs the input's latents")
            steps = max(1, round(config.inversion_strength * len(timesteps)))
            trajectory = ddim_invert(lambda x, t: self.predict(x, t, e_opt), latents, scheduler, steps)
            timesteps = timesteps[len(timesteps) - steps :]
            mix = config.inversion_noise  # seeds perturb the inverted start, keeping its variance
            start = {seed: (1 - mix**2) ** 0.5 * trajectory[-1].cpu() + mix * noise for seed, noise in start_noise.items()}
        else:
            start = {seed: noise * scheduler.init_noise_sigma for seed, noise in start_noise.items()}

        base_state = None  # full fine-tune with a base unconditional branch: the base weights, on device once
        if config.unconditional_model == "base" and self._unet_modified and not getattr(self.unet, "peft_config", None):
            base_state = self._base_state()
        mask = None
        if config.mask_threshold > 0:
            mask = edit_mask(
                self.predict, latents, self.noise_scheduler,
                e_tgt, e_opt, torch.Generator().manual_seed(config.seed), threshold=config.mask_threshold,
            )
        images = {}
        with self._attention_injection(config) as injection:
            for chunk in self._render_chunks(etas, seeds, config):
                n = len(chunk)
                injection.group_size = n
                cond = torch.cat([interpolate(e_tgt, e_opt, max(eta, 0.0)) for eta, _ in chunk])  # (n, L, D)
                x = torch.cat([start[seed] for _, seed in chunk]).to(self.device)  # (n, C, h, w)
                for i, t in enumerate(timesteps):
                    progress = i / len(timesteps)
                    injection.active = progress < config.attention_injection
                    step_cond = e_opt.expand(n, -1, -1) if progress < config.anchor_fraction else cond
                    guided = self._guided_prediction(x, t, step_cond, uncond.expand(n, -1, -1), config, base_state)
                    x = ddim_step(scheduler, guided, t, x)
                    self._check_deadline()
                    if mask is not None:  # outside the edit mask, the input's own trajectory
                        x = mask * x + (1 - mask) * trajectory[len(timesteps) - i - 1]
                images.update((key, image) for key, image in zip(chunk, self.to_images(x, chunk, e_tgt, config))
                              if key[0] >= 0)
        return images

    def to_images(self, x: torch.Tensor, keys: list[tuple[float, int]], e_tgt: torch.Tensor,
                  config: EditConfig) -> list[Image.Image]:
        """The rendered samples `x` (one per (η, seed) in `keys`) as images: decoded (a cascade: upsampled)."""
        return self.decode_latents(x, config)

    def _render_chunks(self, etas, seeds, config: EditConfig) -> list[list[tuple[float, int]]]:
        """(η, seed) groups rendered in one batch. With attention injection each group is one seed's and
        starts with its source branch (η = 0 at e_opt, keyed η = −1: rendered, not returned)."""
        grid = [(float(eta), int(seed)) for seed in seeds for eta in etas]
        if config.attention_injection == 0:
            size = config.render_batch_size
            return [grid[i : i + size] for i in range(0, len(grid), size)]
        size = max(1, config.render_batch_size - 1)
        chunks = []
        for seed in seeds:
            own = [key for key in grid if key[1] == seed]
            chunks += [[(-1.0, int(seed)), *own[i : i + size]] for i in range(0, len(own), size)]
        return chunks

    def _guided_prediction(self, x, t, cond, uncond, config: EditConfig, base_state=None) -> torch.Tensor:
        """Classifier-free guidance; the unconditional branch from the fine-tuned or the base UNet."""
        with self._autocast(config):
            if config.unconditional_model == "finetuned":
                both = self.predict(torch.cat([x, x]), t, torch.cat([uncond, cond]))
                uncond_pred, cond_pred = both.float().chunk(2)
            else:
                cond_pred = self.predict(x, t, cond).float()
                uncond_pred = self._base_prediction(x, t, uncond, base_state).float()
        return uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)

    def _base_prediction(self, x, t, embedding, base_state) -> torch.Tensor:
        """The UNet's output as it was before this edit's fine-tune (LoRA off, or the base weights)."""
        if getattr(self.unet, "peft_config", None):
            self.unet.disable_adapters()
            try:
                return self.predict(x, t, embedding)
            finally:
                self.unet.enable_adapters()
        if base_state is None:  # nothing was fine-tuned
            return self.predict(x, t, embedding)
        return torch.func.functional_call(self.unet, base_state, (x, t), self.unet_inputs(x, embedding)).sample

    def _attention_injection(self, config: EditConfig):
        if config.attention_injection == 0:
            return contextlib.nullcontext(SourceAttention())  # inert: never active
        return injected_self_attention(self.unet)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, config: EditConfig) -> list[Image.Image]:
        if self.vae is None:
            return to_images(latents)
        with self._vae_autocast(config):
            pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # (n, 3, H, W)
        return to_images(pixels)

    # ------------------------------------------------------------------ weights

    def apply_delta(self, delta: dict[str, torch.Tensor], config: EditConfig) -> None:
        """Put an edit's fine-tuned weights in place: LoRA weights, or base + delta for a full fine-tune."""
        self._apply_unet_delta(delta, config)

    def _apply_unet_delta(self, delta: dict[str, torch.Tensor], config: EditConfig) -> None:
        self._unet_modified = True
        with torch.no_grad():
            if config.finetune_method == "lora":
                self._add_lora(config)
                params = {name: p for name, p in self.unet.named_parameters() if "lora_" in name}
                if set(params) != set(delta):
                    raise ValueError(
                        f"LoRA delta does not fit this model ({len(set(delta) - set(params))} unexpected, "
                        f"{len(set(params) - set(delta))} missing weights)"
                    )
            else:
                base = self._base_state()
                params = dict(self.unet.named_parameters())
                if set(params) != set(delta):
                    raise ValueError("weight delta does not fit this model's UNet")
                delta = {name: base[name] + d.to(base[name].device) for name, d in delta.items()}
            for name, value in delta.items():
                params[name].copy_(value)
        self.unet.requires_grad_(False)

    def restore(self) -> None:
        """Base weights back, bit for bit, and no LoRA layers left."""
        if not self._unet_modified:
            return
        if getattr(self.unet, "peft_config", None):
            self.unet.unload_lora()
        if self._base_unet_state is not None:
            self.unet.load_state_dict(self._base_unet_state)
        self.unet.requires_grad_(False)
        self._unet_modified = False

    def _check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise TimeoutError("the edit ran past its time limit")

    def recover(self) -> None:
        """After a failed edit: the model exactly as it was loaded (no LoRA layer left, even half-added ones;
        base weights back), and the GPU's cached memory freed, so that the next entry runs as if on a fresh
        worker."""
        self._unet_modified = True
        if getattr(self.unet, "peft_config", None):
            self.unet.unload_lora()
        _strip_lora_layers(self.unet)
        if hasattr(self.unet, "_hf_peft_config_loaded"):
            self.unet._hf_peft_config_loaded = False
        self.restore()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _base_state(self) -> dict[str, torch.Tensor]:
        # Taken once per Editor on first need, before any edit touches it: a copy the UNet's size, kept on the
        # UNet's device (on a GPU, restoring and `unconditional_model=base` never cross PCIe).
        if self._base_unet_state is None:
            self._base_unet_state = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return self._base_unet_state

    def _add_lora(self, config: EditConfig) -> None:
        from peft import LoraConfig

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or config.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_target_modules),
        )
        # peft draws LoRA's initial A from the global RNG: seed it, without disturbing the caller's state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.unet.add_adapter(lora, adapter_name=LORA_ADAPTER)
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trained weights stay fp32 under autocast

    def _vae_autocast(self, config: EditConfig):
        # SDXL's VAE overflows in half precision (its config says `force_upcast`): it runs in fp32.
        return contextlib.nullcontext() if self.vae and self.vae.config.get("force_upcast") else self._autocast(config)

    def _precision(self, config: EditConfig) -> str:
        """`auto`: bf16 on CUDA (the fast path), fp32 elsewhere."""
        if config.mixed_precision == "auto":
            return "bf16" if self.device.type == "cuda" else "no"
        return config.mixed_precision

    def _autocast(self, config: EditConfig):
        precision = self._precision(config)
        if precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def _strip_lora_layers(model: torch.nn.Module) -> None:
    """Put back the original module wherever a peft layer wraps one (what a failed add_adapter leaves)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).get_base_layer())


def failure_reason(error: BaseException) -> tuple[str, str]:
    """(reason, message) for an edit that raised: what went wrong, and what to do about it."""
    if isinstance(error, TimeoutError):
        return "time_limit", f"{error} (operator setting IMAGIC_ENTRY_TIMEOUT_S)"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out_of_memory", (f"the GPU ran out of memory ({str(error).splitlines()[0]}); lower render_batch_size "
                                 "or train_batch_size, or set finetune_method=lora, mixed_precision=bf16, "
                                 "gradient_checkpointing=true")
    return "engine_error", f"{type(error).__name__}: {error}"


def _check_etas(config: EditConfig, etas) -> list[float]:
    """η = 0 rendered beside the outputs when scoring, to ask whether the edit still holds the input."""
    return [] if not config.score_outputs or 0.0 in etas else [0.0]


def ddim_step(scheduler: DDIMScheduler, prediction: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """One DDIM step. Where the schedule clips or thresholds x0 (pixel-space models: IF's dynamic thresholding),
    ε is re-derived from the clipped x0, as GLIDE and Imagen do: mixed with the unclipped ε, a cosine
    schedule's first steps (x0 predicted from almost pure noise) wash every render out to gray."""
    clipped = bool(scheduler.config.thresholding or scheduler.config.clip_sample)
    return scheduler.step(prediction, t, x, use_clipped_model_output=clipped).prev_sample


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → pixels in [-1, 1], shape (1, 3, H, W)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return pixels.permute(2, 0, 1).unsqueeze(0)


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels in [-1, 1], shape (n, 3, H, W) → RGB images."""
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def finetune_bytes(unet: torch.nn.Module, config: EditConfig) -> int:
    """fp32 weights, gradients, the base snapshot and Adam's two moments (fp32, or 1 byte each in 8-bit)."""
    return sum(p.numel() for p in unet.parameters()) * (4 + 4 + 4 + (2 if config.use_8bit_adam else 8))


def interpolate(e_tgt: torch.Tensor, e_opt: torch.Tensor, eta: float) -> torch.Tensor:
    """ē = η·e_tgt + (1−η)·e_opt: η=0 is exactly e_opt (the input image), η=1 exactly e_tgt."""
    return eta * e_tgt + (1.0 - eta) * e_opt


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls and convolutions on CUDA while an edit runs; the caller's settings after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _adam(params: list[torch.Tensor], lr: float, config: EditConfig, device: torch.device) -> torch.optim.Optimizer:
    use_8bit = config.use_8bit_adam
    if not use_8bit:
        # Fused: one kernel for every parameter (CUDA); the default foreach kernels elsewhere.
        return torch.optim.Adam(params, lr=lr, fused=True if config.fused_adam and device.type == "cuda" else None)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError("use_8bit_adam needs bitsandbytes: pip install 'imagic-batch[cuda]'") from err
    return bnb.optim.Adam8bit(params, lr=lr)


class _StageStats:
    """Wall seconds and peak memory per stage (CUDA: allocator peak; CPU: process peak RSS so far)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_memory_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak_memory_bytes[name] = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_memory_bytes[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.seconds[name] = time.perf_counter() - start
