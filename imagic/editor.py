"""Imagic (Kawar et al., CVPR 2023) on any diffusers Stable Diffusion pipeline.

    image ──vae──► latents x0 ─┐
    target text ──clip──► e_tgt ──(1) optimise, model frozen──► e_opt
                               └─(2) fine-tune the UNet (full or LoRA), e_opt fixed
    (3) render ē = η·e_tgt + (1−η)·e_opt for every (η, seed), classifier-free guided, DDIM

One `Editor` holds one loaded pipeline and edits many images in turn: each edit restores the base
weights exactly when it ends, without reloading them from disk.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from imagic.anchoring import SourceAttention, ddim_invert, edit_mask, injected_self_attention
from imagic.config import EditConfig, check_grid
from imagic.images import fit_image
from imagic.prediction import training_target
from imagic.result import EditResult
from imagic.scores import score_outputs
from imagic.selection import select

# (stage, step, total_steps, loss): how the engine reports progress without knowing who listens.
ProgressCallback = Callable[[str, int, int, float], None]
LORA_ADAPTER = "imagic"
LORA_TARGET_EXAMPLES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in")


class Editor:
    """Runs Imagic's three stages on `pipeline` (its weights fp32; see `imagic.models.load_pipeline`)."""

    def __init__(self, pipeline: StableDiffusionPipeline):
        self.pipeline = pipeline
        self.unet, self.vae = pipeline.unet, pipeline.vae
        self.text_encoder, self.tokenizer = pipeline.text_encoder, pipeline.tokenizer
        self.device = pipeline.device
        for model in (self.unet, self.vae, self.text_encoder):
            model.requires_grad_(False)
        # Training uses the checkpoint's own noise schedule; rendering uses DDIM on the same betas.
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = self.unet.config.sample_size * self.vae_scale_factor
        self._base_unet_state: dict[str, torch.Tensor] | None = None  # snapshot for full fine-tunes
        self._unet_modified = False

    # ------------------------------------------------------------------ the whole edit

    def edit(
        self,
        image: Image.Image,
        target_text: str,
        config: EditConfig,
        etas: tuple[float, ...] | list[float],
        seeds: tuple[int, ...] | list[int] = (0,),
        callback: ProgressCallback | None = None,
    ) -> EditResult:
        """Edit `image` towards `target_text`; one image per (η, seed). Base weights are restored after."""
        # 1. Check inputs
        self.check_inputs(config, etas, seeds)
        stats = _StageStats(self.device)
        generator = torch.Generator().manual_seed(config.seed)  # every training draw comes from here
        image = fit_image(image.convert("RGB"), self.resolution)

        try:
            # 2. Encode the image once, and the target text
            with stats.stage("encode"):
                latents = self.encode_image(image, config)
                e_tgt = self.encode_text(target_text)
            # 3. Stage A: optimise the text embedding, model frozen
            with stats.stage("embedding"):
                e_opt, embedding_losses = self.optimize_embedding(latents, e_tgt, config, generator, callback)
            # 4. Stage B: fine-tune the model with e_opt fixed
            with stats.stage("finetune"):
                delta, finetune_losses = self.finetune(latents, e_opt, config, generator, callback)
            # 5. Stage C: interpolate and render (and η=0 once more: does the edit still hold the input?)
            with stats.stage("render"):
                check = [] if not config.score_outputs or 0.0 in etas else [0.0]
                images = self.render(e_tgt, e_opt, [*etas, *check], seeds, config, latents)
        finally:
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
            losses={"embedding": embedding_losses, "finetune": finetune_losses},
            seconds=stats.seconds,
            peak_memory_bytes=stats.peak_memory_bytes,
            scores=scores,
            reconstruction_fidelity=reconstruction,
            selection=selection,
        )

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
            return self.render(
                result.e_tgt.to(self.device), result.e_opt.to(self.device), etas, seeds, result.config, latents
            )
        finally:
            self.restore()

    def check_inputs(self, config: EditConfig, etas, seeds) -> None:
        """ValueError for a request this pipeline cannot run, before anything is changed."""
        check_grid(list(etas), list(seeds))
        if config.finetune_method == "lora":
            # peft fails only after it has started wrapping modules: name the targets it would miss first.
            names = [name for name, _ in self.unet.named_modules()]
            missing = [t for t in config.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                raise ValueError(f"lora_target_modules {missing} name no module of this UNet "
                                 f"(e.g. {', '.join(LORA_TARGET_EXAMPLES)})")
        if self.device.type != "cuda":
            cuda_only = []
            if config.mixed_precision != "no":
                cuda_only.append(f"mixed_precision={config.mixed_precision!r}")
            if config.use_8bit_adam:
                cuda_only.append("use_8bit_adam=True")
            if cuda_only:
                raise ValueError(f"{', '.join(cuda_only)} need a CUDA device; this pipeline is on {self.device}")

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_image(self, image: Image.Image, config: EditConfig) -> torch.Tensor:
        """RGB image at `self.resolution` → scaled VAE latents, shape (1, C, H/f, W/f)."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3) in [-1, 1]
        pixels = pixels.permute(2, 0, 1).unsqueeze(0).to(self.device)  # (1, 3, H, W)
        with self._autocast(config):
            latents = self.vae.encode(pixels).latent_dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, text: str) -> torch.Tensor:
        """Text → CLIP hidden states, shape (1, L, D). Too-long text is an error, never silently cut."""
        max_length = self.tokenizer.model_max_length
        ids = self.tokenizer(text, padding="max_length", max_length=max_length, truncation=False, return_tensors="pt")
        if ids.input_ids.shape[1] > max_length:
            raise ValueError(f"text is {ids.input_ids.shape[1]} tokens; this model takes at most {max_length}: {text!r}")
        return self.text_encoder(ids.input_ids.to(self.device))[0].float()

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
        losses = self._train(
            "embedding", [e_opt], config.embedding_lr, config.embedding_steps,
            lambda: self.denoising_loss(latents, e_opt, config, generator), config, callback,
        )
        return e_opt.detach(), losses

    def finetune(
        self,
        latents: torch.Tensor,
        e_opt: torch.Tensor,
        config: EditConfig,
        generator: torch.Generator,
        callback: ProgressCallback | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[float]]:
        """Stage B: fit the UNet (all weights, or LoRA on attention projections) to the image at e_opt.

        Leaves the fine-tuned weights in place for rendering and returns (weight delta, losses):
        LoRA weights, or trained − base for a full fine-tune. `restore()` undoes it.
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
        losses = self._train(
            "finetune", params, config.finetune_lr, config.finetune_steps,
            lambda: self.denoising_loss(latents, e_opt, config, generator), config, callback,
        )
        self.unet.requires_grad_(False)

        if config.finetune_method == "lora":
            delta = {name: p.detach().cpu().clone() for name, p in self.unet.named_parameters() if "lora_" in name}
        else:
            delta = {name: p.detach().cpu() - base[name] for name, p in self.unet.named_parameters()}
            # Render from base + delta, exactly what a later render-only run reconstructs.
            self.apply_delta(delta, config)
        return delta, losses

    def denoising_loss(
        self, latents: torch.Tensor, embedding: torch.Tensor, config: EditConfig, generator: torch.Generator
    ) -> torch.Tensor:
        """MSE between the UNet's prediction and its target, at t ~ U[0, T) with fresh noise."""
        batch = config.train_batch_size
        shape = (batch, *latents.shape[1:])
        noise = torch.randn(shape, generator=generator).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        timesteps = timesteps.to(self.device)
        x0 = latents.expand(shape)
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        target = training_target(self.noise_scheduler, x0, noise, timesteps)
        with self._autocast(config):
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=embedding.expand(batch, -1, -1)).sample
        return F.mse_loss(prediction.float(), target.float())

    def _train(self, stage, params, lr, steps, loss_fn, config: EditConfig, callback) -> list[float]:
        """Adam on `params` for `steps` steps of `loss_fn`; returns the per-step losses."""
        if steps == 0:
            return []
        optimizer = _adam(params, lr, config.use_8bit_adam)
        scaler = torch.amp.GradScaler("cuda", enabled=config.mixed_precision == "fp16")
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        losses = []
        try:
            for step in range(1, steps + 1):
                loss = loss_fn()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if callback is not None:
                    callback(stage, step, steps, losses[-1])
        finally:
            if config.gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()
        return losses

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
        scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(config.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        shape = (1, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        start_noise = {seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds}
        if config.render_start == "inversion":
            if latents is None:
                raise ValueError("render_start='inversion' needs the input's latents")
            steps = max(1, round(config.inversion_strength * len(timesteps)))
            trajectory = ddim_invert(
                lambda x, t: self.unet(x, t, encoder_hidden_states=e_opt).sample, latents, scheduler, steps
            )
            timesteps = timesteps[len(timesteps) - steps :]
            mix = config.inversion_noise  # seeds perturb the inverted start, keeping its variance
            start = {seed: (1 - mix**2) ** 0.5 * trajectory[-1].cpu() + mix * noise for seed, noise in start_noise.items()}
        else:
            start = {seed: noise * scheduler.init_noise_sigma for seed, noise in start_noise.items()}

        base_state = None  # full fine-tune with a base unconditional branch: the base weights, on device once
        if config.unconditional_model == "base" and self._unet_modified and not getattr(self.unet, "peft_config", None):
            base_state = {k: v.to(self.device) for k, v in self._base_state().items()}
        mask = None
        if config.mask_threshold > 0:
            mask = edit_mask(
                lambda x, t, e: self.unet(x, t, encoder_hidden_states=e).sample, latents, self.noise_scheduler,
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
                    x = scheduler.step(guided, t, x).prev_sample
                    if mask is not None:  # outside the edit mask, the input's own trajectory
                        x = mask * x + (1 - mask) * trajectory[len(timesteps) - i - 1]
                images.update((key, image) for key, image in zip(chunk, self.decode_latents(x, config)) if key[0] >= 0)
        return images

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
                both = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                uncond_pred, cond_pred = both.float().chunk(2)
            else:
                cond_pred = self.unet(x, t, encoder_hidden_states=cond).sample.float()
                uncond_pred = self._base_prediction(x, t, uncond, base_state).float()
        return uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)

    def _base_prediction(self, x, t, embedding, base_state) -> torch.Tensor:
        """The UNet's output as it was before this edit's fine-tune (LoRA off, or the base weights)."""
        if getattr(self.unet, "peft_config", None):
            self.unet.disable_adapters()
            try:
                return self.unet(x, t, encoder_hidden_states=embedding).sample
            finally:
                self.unet.enable_adapters()
        if base_state is None:  # nothing was fine-tuned
            return self.unet(x, t, encoder_hidden_states=embedding).sample
        return torch.func.functional_call(self.unet, base_state, (x, t), {"encoder_hidden_states": embedding}).sample

    def _attention_injection(self, config: EditConfig):
        if config.attention_injection == 0:
            return contextlib.nullcontext(SourceAttention())  # inert: never active
        return injected_self_attention(self.unet)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, config: EditConfig) -> list[Image.Image]:
        with self._autocast(config):
            pixels = self.vae.decode(latents / self.vae.config.scaling_factor).sample  # (n, 3, H, W)
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]

    # ------------------------------------------------------------------ weights

    def apply_delta(self, delta: dict[str, torch.Tensor], config: EditConfig) -> None:
        """Put an edit's fine-tuned weights in place: LoRA weights, or base + delta for a full fine-tune."""
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
                delta = {name: base[name] + d for name, d in delta.items()}
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
        # Taken once per Editor on first need (a CPU copy the UNet's size), before any edit touches it.
        if self._base_unet_state is None:
            self._base_unet_state = {k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items()}
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

    def _autocast(self, config: EditConfig):
        if config.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
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
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return "out_of_memory", (f"the GPU ran out of memory ({str(error).splitlines()[0]}); lower render_batch_size "
                                 "or train_batch_size, or set finetune_method=lora, mixed_precision=bf16, "
                                 "gradient_checkpointing=true")
    return "engine_error", f"{type(error).__name__}: {error}"


def interpolate(e_tgt: torch.Tensor, e_opt: torch.Tensor, eta: float) -> torch.Tensor:
    """ē = η·e_tgt + (1−η)·e_opt: η=0 is exactly e_opt (the input image), η=1 exactly e_tgt."""
    return eta * e_tgt + (1.0 - eta) * e_opt


def _adam(params: list[torch.Tensor], lr: float, use_8bit: bool) -> torch.optim.Optimizer:
    if not use_8bit:
        return torch.optim.Adam(params, lr=lr)
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
