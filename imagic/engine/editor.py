"""Imagic (Kawar et al., CVPR 2023) on any diffusers Stable Diffusion pipeline, a pixel-space IF base, or
a cascade of a base and a super-resolution model (the paper's Imagen setting).

    image ──vae──► latents x0 ─┐            (a pixel-space model: x0 is the image itself)
    target text ──clip──► e_tgt ──(1) optimise, model frozen──► e_opt
                               └─(2) fine-tune the UNet (full or LoRA), e_opt fixed
    (3) render ē = η·e_tgt + (1−η)·e_opt for every (η, seed), classifier-free guided, DDIM

One `Editor` holds one loaded pipeline and edits many images in turn: each edit restores the base
weights exactly when it ends, without reloading them from disk. A `CascadeEditor` edits with its base the
same way and holds the super-resolution model as a second denoiser (imagic/engine/cascade.py);
`Editor.from_pretrained` picks the right one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from imagic.engine.anchoring import SourceAttention, edit_mask, injected_self_attention, render_start
from imagic.engine.cascade import SR_PREFIX, SuperResolution, cascade_memory_needs, split_delta, sr_config
from imagic.engine.config import SR_OPTIONS, EditConfig
from imagic.engine.checkpoints import Checkpoints
from imagic.engine.denoiser import Denoiser, ProgressCallback, check_fits, tf32
from imagic.engine.grid import check_grid, check_image_etas, interpolate, render_chunks
from imagic.engine.images import fit_image, unfit_image
from imagic.engine.loading import Cascade, load_pipeline, scheduler_config
from imagic.engine.result import EditResult
from imagic.engine.sampling import ddim_step, ddpm_step_mean
from imagic.engine.scores import score_outputs
from imagic.engine.selection import select
from imagic.engine.stats import StageStats
from imagic.engine.tensors import cast_weights, image_to_pixels, pixels_to_images, weight_bytes

T5_MAX_TOKENS = 77  # what DeepFloyd IF's pipelines encode (its T5 tokenizer would allow 512)


class Editor(Denoiser):
    """Runs Imagic's three stages on `pipeline` (its weights fp32; see `imagic.engine.loading.load_pipeline`)."""

    has_super_resolution = False

    def __init__(self, pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline):
        if isinstance(pipeline, Cascade):
            raise TypeError("a cascade is edited by CascadeEditor (Editor.from_pretrained picks it)")
        super().__init__(pipeline.unet, pipeline.scheduler, pipeline.device)
        self.pipeline = pipeline
        self.vae = getattr(pipeline, "vae", None)  # no VAE: a pixel-space model
        self.text_encoder, self.tokenizer = pipeline.text_encoder, pipeline.tokenizer
        # SDXL: a second text encoder, and a pooled embedding the UNet takes beside the sequence.
        self.text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipeline, "tokenizer_2", None)
        self.is_xl = self.unet.config.addition_embed_type == "text_time"
        self._fp32_copies: dict[int, dict[str, torch.Tensor]] = {}  # the text encoders' loaded weights, while cast down
        self._time_ids: dict[tuple, torch.Tensor] = {}  # SDXL's size conditioning, by (height, width, dtype, device)
        for model in (self.vae, self.text_encoder, self.text_encoder_2):
            if model is not None:
                model.requires_grad_(False)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 1
        self.resolution = self.unet.config.sample_size * self.vae_scale_factor
        # Image sides must divide down to the UNet's smallest feature map.
        self.size_multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, model: str, device: str | torch.device = "cpu") -> Editor:
        """The editor for `model` (see `imagic.engine.loading.load_pipeline`): a cascade gets a `CascadeEditor`."""
        pipeline = load_pipeline(model, device)
        return CascadeEditor(pipeline) if isinstance(pipeline, Cascade) else cls(pipeline)

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
        checkpoints: Checkpoints | None = None,
    ) -> EditResult:
        """Edit `image` towards `target_text`; one image per (η, seed). Base weights are restored after.
        `deadline` (a `time.monotonic()` value): past it, the edit stops with a TimeoutError. `checkpoints`:
        training saved as it goes, stopped when asked (`Preempted`), resumed from what it holds."""
        # 1. Check inputs
        self.check_inputs(config, etas, seeds)
        self.prepare_weights(config)
        self.deadline.at = deadline
        self.use_checkpoints(checkpoints)
        stats = StageStats(self.device)
        generator = torch.Generator().manual_seed(config.seed)  # every training draw comes from here
        original = image.convert("RGB")
        image, input_transform = self.fit(original, config)

        with tf32(config.tf32 and self.device.type == "cuda"):  # the fast path: TF32 for what runs in fp32
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
                    check = check_image_etas(etas, config.score_outputs)
                    images = self.render(e_tgt, e_opt, [*etas, *check], seeds, config, latents)
            finally:
                self.deadline.at = None
                self.use_checkpoints(None)
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
        # 7. The outputs at the input's size (scored above at the model's, where the scores were tuned)
        if config.output_size == "input":
            images = {key: unfit_image(output, original, input_transform) for key, output in images.items()}
        input_transform["output_size"] = list(next(iter(images.values())).size) if images else None

        return EditResult(
            target_text=target_text,
            config=config,
            input_image=original if config.output_size == "input" else image,
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

    def use_checkpoints(self, checkpoints: Checkpoints | None) -> None:
        self.checkpoints = checkpoints

    def fit(self, image: Image.Image, config: EditConfig) -> tuple[Image.Image, dict]:
        """The input at the size this model edits it (`fit_image`), and what was done to it."""
        return fit_image(image, self.resolution, config.fit, self.size_multiple, config.max_area)

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
        # The saved input is at the outputs' size: the input as given (output_size=input), or already fitted.
        fitted, transform = self.fit(result.input_image, result.config)
        self.prepare_weights(result.config)
        try:
            latents = self.encode_image(fitted, result.config)
            self.apply_delta(result.delta, result.config)
            # The edit's own check image too: batched as the edit batched them, the same η/seed renders (and
            # rounds) exactly alike.
            check = check_image_etas(etas, result.config.score_outputs)
            images = self.render(
                result.e_tgt.to(self.device), result.e_opt.to(self.device), [*etas, *check], seeds, result.config,
                latents,
            )
            images = {key: image for key, image in images.items() if key[0] not in check}
            if result.config.output_size == "input":
                images = {key: unfit_image(image, result.input_image, transform) for key, image in images.items()}
            return images
        finally:
            self.restore()

    def prepare_weights(self, config: EditConfig) -> None:
        """The UNet's base weights and the text encoders in the compute dtype (the VAE stays fp32)."""
        super().prepare_weights(config)
        for encoder in (self.text_encoder, self.text_encoder_2):
            if encoder is not None:
                cast_weights(encoder, self.compute_dtype(config), self._fp32_copies)

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
        check_fits(self.memory_needs(config), torch.cuda.get_device_properties(self.device).total_memory, config)

    def memory_needs(self, config: EditConfig) -> dict[str, int]:
        """Bytes an edit holds on the device at its peak, by part (`Denoiser.unet_memory_needs`, frozen models)."""
        return {**self.unet_memory_needs(config, self.encode_text("")), "frozen models": self.frozen_bytes(config)}

    def frozen_bytes(self, config: EditConfig) -> int:
        frozen = weight_bytes(self.vae) if self.vae is not None else 0
        for encoder in (self.text_encoder, self.text_encoder_2):
            if encoder is not None:
                itemsize = min(self.compute_dtype(config).itemsize, next(encoder.parameters()).element_size())
                frozen += sum(p.numel() for p in encoder.parameters()) * itemsize
        return frozen

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_image(self, image: Image.Image, config: EditConfig) -> torch.Tensor:
        """RGB image at `self.resolution` → scaled VAE latents, shape (1, C, H/f, W/f); a pixel-space model
        takes the pixels in [-1, 1], shape (1, 3, H, W)."""
        pixels = image_to_pixels(image).to(self.device)
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
            # IFPipeline's prompt preprocessing without its optional caption cleaner (bs4, ftfy): lower-cased,
            # stripped, as IF's T5 saw its captions.
            text = text.lower().strip()
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
        # (original size, crop top-left, target size): the whole image at its rendered size. Built once per size:
        # a tensor made from Python numbers on a GPU is a blocking copy, and this runs every step.
        if (time_ids := self._time_ids.get(key := (height, width, x.dtype, x.device))) is None:
            time_ids = self._time_ids[key] = torch.tensor([[height, width, 0, 0, height, width]], dtype=x.dtype, device=x.device)
        return {"encoder_hidden_states": embedding[:, :-1],
                "added_cond_kwargs": {"text_embeds": embedding[:, -1, :pooled_dim],
                                      "time_ids": time_ids.expand(x.shape[0], -1)}}

    # ------------------------------------------------------------------ stage A (stage B: Denoiser.finetune)

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
        losses = self.optimize("embedding", [e_opt], config.embedding_lr, config.embedding_steps, latents, e_opt,
                               config, generator, callback)
        return e_opt.detach(), losses

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

        Where each seed starts is `render_start`'s (see `imagic.engine.anchoring`): seed noise (the paper), the
        DDIM inversion of the input `latents`, or its edit-friendly DDPM inversion. The anchoring options act
        on the denoising steps in the order they run.
        """
        # The negative branch of guidance: the empty text (the paper), or e_opt — the input itself, so that
        # guidance pushes only along what the text changes (negative-prompt inversion, arXiv 2305.16807).
        uncond = self.encode_text("") if config.negative_embedding == "empty" else e_opt  # (1, L, D)
        scheduler = DDIMScheduler.from_config(scheduler_config(self.scheduler))
        scheduler.set_timesteps(config.num_inference_steps, device=self.device)
        side = self.unet.config.sample_size
        shape = (1, self.unet.config.in_channels, *(latents.shape[-2:] if latents is not None else (side, side)))
        base_state = None  # full fine-tune with a base unconditional branch: the base weights, on device once
        if config.unconditional_model == "base" and self.weights.modified and not self.weights.has_lora:
            base_state = self.weights.base_state()
        start = render_start(
            config, scheduler, shape, seeds, latents, lambda x, t: self.predict_in(config, x, t, e_opt),
            lambda x, t: self.guided_prediction(x, t, e_opt.expand(len(x), -1, -1), uncond.expand(len(x), -1, -1),
                                                config, base_state),
        )
        timesteps = start.timesteps
        mask = None
        if config.mask_threshold > 0:
            mask = edit_mask(
                lambda x, t, embedding: self.predict_in(config, x, t, embedding), latents, self.noise_scheduler,
                e_tgt, e_opt, torch.Generator().manual_seed(config.seed), threshold=config.mask_threshold,
            )
        images = {}
        with self._attention_injection(config) as injection:
            for chunk in render_chunks(etas, seeds, config):
                n = len(chunk)
                injection.group_size = n
                cond = torch.cat([interpolate(e_tgt, e_opt, max(eta, 0.0)) for eta, _ in chunk])  # (n, L, D)
                x = torch.cat([start.latents[seed] for _, seed in chunk]).to(self.device)  # (n, C, h, w)
                for i, t in enumerate(timesteps):
                    progress = i / len(timesteps)
                    injection.active = progress < config.attention_injection
                    step_cond = e_opt.expand(n, -1, -1) if progress < config.anchor_fraction else cond
                    guided = self.guided_prediction(x, t, step_cond, uncond.expand(n, -1, -1), config, base_state)
                    if start.corrections is None:
                        x = ddim_step(scheduler, guided, t, x)
                    else:  # the stochastic step, with the noise that reproduces the input at e_opt
                        x = ddpm_step_mean(scheduler, guided, t, x) + torch.cat(
                            [start.corrections[seed][i] for _, seed in chunk])
                    self.deadline.check()
                    if mask is not None:  # outside the edit mask, the input's own trajectory
                        x = mask * x + (1 - mask) * torch.cat([start.trajectory[seed][i] for _, seed in chunk])
                images.update((key, image) for key, image in zip(chunk, self.samples_to_images(x, chunk, e_tgt, config))
                              if key[0] >= 0)
        return images

    def samples_to_images(self, x: torch.Tensor, keys: list[tuple[float, int]], e_tgt: torch.Tensor,
                  config: EditConfig) -> list[Image.Image]:
        """The rendered samples `x` (one per (η, seed) in `keys`) as images: decoded (a cascade: upsampled)."""
        return self.decode_latents(x, config)

    def _attention_injection(self, config: EditConfig):
        if config.attention_injection == 0:
            return contextlib.nullcontext(SourceAttention())  # inert: never active
        return injected_self_attention(self.unet)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, config: EditConfig) -> list[Image.Image]:
        if self.vae is None:
            return pixels_to_images(latents)
        with self._vae_autocast(config):
            pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # (n, 3, H, W)
        return pixels_to_images(pixels)

    def _vae_autocast(self, config: EditConfig):
        # SDXL's VAE overflows in fp16 (its config says `force_upcast`): it runs in fp32 then, as diffusers
        # does; bf16 has fp32's range.
        if self.vae and self.vae.config.get("force_upcast") and self.precision(config) == "fp16":
            return contextlib.nullcontext()
        return self.autocast(config)


class CascadeEditor(Editor):
    """Imagic on a `Cascade`: the base model edits, the SR model keeps the edit's detail at full size."""

    has_super_resolution = True

    def __init__(self, cascade: Cascade):
        super().__init__(cascade.base)
        self.pipeline = cascade
        self.super_resolution = SuperResolution(cascade.super_resolution, deadline=self.deadline)
        base_size, sr_size = self.unet.config.sample_size, self.super_resolution.unet.config.sample_size
        if sr_size % base_size:
            raise ValueError(f"the SR model's size {sr_size} is not a multiple of the base's {base_size}")
        self.super_resolution.scale = self.scale = sr_size // base_size
        self.resolution = sr_size  # what an edit takes and makes; the base sees it `scale`× smaller
        self.size_multiple *= self.scale

    def use_checkpoints(self, checkpoints: Checkpoints | None) -> None:
        self.checkpoints = self.super_resolution.checkpoints = checkpoints

    # ------------------------------------------------------------------ the input at each stage

    @torch.no_grad()
    def encode_image(self, image: Image.Image, config: EditConfig) -> torch.Tensor:
        """The image at the base's size (bicubic, as IF was trained), pixels in [-1, 1]: (1, 3, H/s, W/s)."""
        width, height = (side // self.scale for side in image.size)
        return image_to_pixels(image.resize((width, height), Image.Resampling.BICUBIC)).to(self.device)

    def stages(self, config: EditConfig, image: Image.Image) -> list[dict]:
        width, height = image.size
        return [
            {"name": "base", "space": "pixel", "size": [width // self.scale, height // self.scale],
             "finetuned_on": "e_opt"},
            {"name": "super_resolution", "space": "pixel", "size": [width, height], "finetuned_on": "e_tgt",
             "rendered_at": "e_tgt", "noise_level": config.sr_noise_level,
             "steps": sr_config(config).finetune_steps},
        ]

    # ------------------------------------------------------------------ stage B for both models, stage C

    def finetune_all(self, image, latents, e_tgt, e_opt, config, generator, callback, stats):
        """The base on the input at e_opt (stage B), then the SR model on the input at e_tgt: the paper
        conditions it on the target text, so that it renders the edit's detail, not the input's."""
        delta, losses = super().finetune_all(image, latents, e_tgt, e_opt, config, generator, callback, stats)
        sr = self.super_resolution
        with stats.stage("finetune_sr"):
            sr.condition_on(latents, image.size[::-1], config.sr_noise_level)
            sr_callback = None if callback is None else (lambda _, *progress: callback("finetune_sr", *progress))
            sr_delta, losses["finetune_sr"] = sr.finetune(image_to_pixels(image).to(self.device), e_tgt,
                                                          sr_config(config), generator, sr_callback)
        if delta is None:  # a full fine-tune that keeps no delta keeps none for either model
            return None, losses
        return {**delta, **{SR_PREFIX + name: value for name, value in sr_delta.items()}}, losses

    def samples_to_images(self, x: torch.Tensor, keys: list[tuple[float, int]], e_tgt: torch.Tensor,
                          config: EditConfig) -> list[Image.Image]:
        """Each base render upsampled by the SR model at e_tgt (negative: the empty text), seed by seed."""
        pixels = self.super_resolution.upsample(x.clamp(-1, 1), e_tgt, self.encode_text(""),
                                                [seed for _, seed in keys], config)
        return pixels_to_images(pixels)

    # ------------------------------------------------------------------ weights of both models

    def prepare_weights(self, config: EditConfig) -> None:
        super().prepare_weights(config)
        self.super_resolution.prepare_weights(sr_config(config))

    def apply_delta(self, delta: dict[str, torch.Tensor], config: EditConfig) -> None:
        base, sr = split_delta(delta)
        super().apply_delta(base, config)
        self.super_resolution.apply_delta(sr, sr_config(config))

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
        """The peak of the two fine-tunes (see `cascade_memory_needs`)."""
        sr = self.super_resolution.unet_memory_needs(sr_config(config), self.encode_text(""))
        return cascade_memory_needs(super().memory_needs(config), sr, config)
