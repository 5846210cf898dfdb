"""One UNet with its noise schedule: what it predicts, how it is trained on one image, and guidance.

An `Editor` is the denoiser of its pipeline's base UNet plus the text encoders and the three stages; a
cascade's super-resolution model is a second denoiser (imagic/engine/cascade.py) that the editor holds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from imagic.engine.config import EditConfig
from imagic.engine.loading import scheduler_config
from imagic.engine.sampling import training_target
from imagic.engine.weights import UNetWeights, is_lora_target, lora_parameter_count

if TYPE_CHECKING:
    from imagic.engine.checkpoints import Checkpoints

# (stage, step, total_steps, loss): how the engine reports progress without knowing who listens.
ProgressCallback = Callable[[str, int, int, float], None]
LORA_TARGET_EXAMPLES = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in")


class Deadline:
    """The time limit of one edit (a `time.monotonic()` value, or None), shared by every model it trains."""

    def __init__(self):
        self.at: float | None = None

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise TimeoutError("the edit ran past its time limit")


class Denoiser:
    role = "base"  # names its training loops in `Checkpoints`

    def __init__(self, unet, scheduler, device: torch.device, deadline: Deadline | None = None):
        self.unet, self.scheduler, self.device = unet, scheduler, device
        self.unet.requires_grad_(False)
        # Training uses the checkpoint's own noise schedule; rendering uses DDIM on the same betas, with
        # the SD-correct values for what the checkpoint's scheduler config leaves out.
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config(scheduler))
        self.weights = UNetWeights(unet)
        self.deadline = deadline or Deadline()
        self.checkpoints: Checkpoints | None = None  # set for one edit: where its training stands
        self._activation_bytes: dict[tuple, int] = {}

    # ------------------------------------------------------------------ predictions

    def unet_inputs(self, x: torch.Tensor, embedding: torch.Tensor) -> dict:
        """The UNet's conditioning for samples `x` (n, C, h, w) and an embedding (1 or n rows)."""
        return {"encoder_hidden_states": embedding.expand(x.shape[0], -1, -1)}

    def predict(self, x: torch.Tensor, t, embedding: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (ε, v or x0, as its scheduler says) for latents `x` at timestep(s) `t`."""
        output = self.unet(x, t, **self.unet_inputs(x, embedding)).sample
        if output.shape[1] == 2 * x.shape[1]:
            # A learned-variance UNet (DeepFloyd IF: 6 channels for 3) predicts the variance too; the loss and
            # DDIM use the prediction only, as diffusers' own IF fine-tuning scripts do.
            output = output[:, : x.shape[1]]
        return output

    def predict_in(self, config: EditConfig, x: torch.Tensor, t, embedding: torch.Tensor) -> torch.Tensor:
        """`predict` in the edit's compute precision, as fp32 (for the loops that train nothing: inversion,
        masks, scores)."""
        with self.autocast(config):
            return self.predict(x, t, embedding).float()

    def guided_prediction(self, x, t, cond, uncond, config: EditConfig, base_state=None) -> torch.Tensor:
        """Classifier-free guidance; the unconditional branch from the fine-tuned or the base UNet."""
        with self.autocast(config):
            if config.unconditional_model == "finetuned":
                both = self.predict(torch.cat([x, x]), t, torch.cat([uncond, cond]))
                uncond_pred, cond_pred = both.float().chunk(2)
            elif self.weights.has_lora:  # one call still: the unconditional half runs with LoRA off
                with self.weights.lora_off_for_first(len(x)):
                    both = self.predict(torch.cat([x, x]), t, torch.cat([uncond, cond]))
                uncond_pred, cond_pred = both.float().chunk(2)
            else:
                cond_pred = self.predict(x, t, cond).float()
                uncond_pred = self.base_prediction(x, t, uncond, base_state).float()
        return uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)

    def base_prediction(self, x, t, embedding, base_state) -> torch.Tensor:
        """The UNet's output as it was before this edit's fine-tune (LoRA off, or the base weights)."""
        if self.weights.has_lora:
            self.unet.disable_adapters()
            try:
                return self.predict(x, t, embedding)
            finally:
                self.unet.enable_adapters()
        if base_state is None:  # nothing was fine-tuned
            return self.predict(x, t, embedding)
        return torch.func.functional_call(self.unet, base_state, (x, t), self.unet_inputs(x, embedding)).sample

    # ------------------------------------------------------------------ training on one image

    def finetune(
        self,
        latents: torch.Tensor,
        embedding: torch.Tensor,
        config: EditConfig,
        generator: torch.Generator,
        callback: ProgressCallback | None = None,
    ) -> tuple[dict[str, torch.Tensor] | None, list[float]]:
        """Stage B: fit the UNet (all weights, or LoRA) to the image at `embedding`, held fixed.

        Leaves the fine-tuned weights in place for rendering and returns (weight delta, losses); see
        `UNetWeights.trained_delta`. `weights.restore()` undoes it.
        """
        params = self.weights.trainable(config)
        losses = self.optimize("finetune", params, config.finetune_lr, config.finetune_steps, latents,
                               embedding.detach(), config, generator, callback)
        return self.weights.trained_delta(config), losses

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
        with self.autocast(config):
            prediction = self.predict(noisy, timesteps, embedding)
        return F.mse_loss(prediction.float(), target.float())

    def optimize(self, stage, params, lr, steps, latents, embedding, config: EditConfig, generator,
                 callback) -> list[float]:
        """Adam on `params` for `steps` steps of the denoising loss; returns the per-step losses.

        Losses stay on the device and are read back every `loss_readback_steps` steps: a read waits for
        the GPU, and nothing else in the loop does."""
        if steps == 0:
            return []
        noises, timesteps = self.training_draws(latents, steps, config, generator)  # drawn even when resumed
        optimizer = adam(params, lr, config, self.device)
        loop, checkpoints = f"{self.role}.{stage}", self.checkpoints
        start, earlier = checkpoints.start(loop, params, optimizer) if checkpoints else (0, [])
        scaler = torch.amp.GradScaler("cuda", enabled=self.precision(config) == "fp16")
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        losses: list[torch.Tensor] = []

        def losses_so_far() -> list[float]:
            return earlier + (torch.stack(losses).tolist() if losses else [])

        try:
            for step in range(start + 1, steps + 1):
                loss = self.denoising_loss(latents, embedding, noises[step - 1], timesteps[step - 1], config)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                self.deadline.check()
                if callback is not None and (step % config.loss_readback_steps == 0 or step == steps):
                    callback(stage, step, steps, losses[-1].item())
                if checkpoints is not None:
                    checkpoints.after_step(loop, step, steps, params, optimizer, losses_so_far)
        finally:
            if config.gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()
        return losses_so_far()

    # ------------------------------------------------------------------ the base weights, back after each edit

    def apply_delta(self, delta: dict[str, torch.Tensor], config: EditConfig) -> None:
        """Put an edit's fine-tuned weights in place (to render a saved edit again)."""
        self.weights.apply_delta(delta, config)

    def restore(self) -> None:
        """Base weights back, bit for bit, and no LoRA layers left."""
        self.weights.restore()

    def recover(self) -> None:
        """After a failed edit: the model exactly as it was loaded, and the GPU's cached memory freed, so
        that the next entry runs as if on a fresh worker."""
        self.weights.recover()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ requests, memory, precision

    def check_lora_targets(self, config: EditConfig) -> None:
        if config.finetune_method != "lora":
            return
        # peft fails only after it has started wrapping modules: name the targets it would miss first.
        names = [name for name, _ in self.unet.named_modules()]
        missing = [t for t in config.lora_target_modules if not any(is_lora_target(n, [t]) for n in names)]
        if missing:
            raise ValueError(f"lora_target_modules {missing} name no module of this UNet "
                             f"(e.g. {', '.join(LORA_TARGET_EXAMPLES)})")

    def unet_memory_needs(self, config: EditConfig, embedding: torch.Tensor) -> dict[str, int]:
        """Bytes this UNet's training holds on the device, by part (`embedding`: one like the edit's, for the
        activation count):
        - weights, at `frozen_dtype`;
        - training: per trained parameter (every one, or LoRA's) fp32 gradients, Adam's two moments (8-bit: 1
          byte each), autocast's compute-dtype copy, and the fp32 weight itself (LoRA) or the fp32 snapshot of
          the base (full);
        - every step's noise and timesteps, drawn up front (`training_draws`), for the longer stage;
        - activations: what one training step keeps for its backward pass (`activation_bytes`)."""
        params = sum(p.numel() for p in self.unet.parameters())
        trained = params if config.finetune_method == "full" else lora_parameter_count(self.unet, config)
        cast_copy = self.compute_dtype(config).itemsize if self.precision(config) != "no" else 0
        per_trained = 4 + 4 + (2 if config.use_8bit_adam else 8) + cast_copy
        steps, (channels, *side) = max(config.embedding_steps, config.finetune_steps), self.draw_shape()
        noise = steps * config.train_batch_size * (channels * side[0] * side[1] * 4 + 8)
        return {"unet weights": params * self.frozen_dtype(config).itemsize, "unet training": trained * per_trained,
                "training noise": round(noise * self.area_ratio(config)),
                "activations": round(self.activation_bytes(config, embedding) * self.area_ratio(config))}

    def draw_shape(self) -> tuple[int, int, int]:
        """The shape of one training draw's noise (C, h, w) at the model's native size."""
        side = self.unet.config.sample_size
        return self.unet.config.in_channels, side, side

    def area_ratio(self, config: EditConfig) -> float:
        """The edit's pixels over the model's native pixels (`max_area`; what activations scale with)."""
        native = getattr(self, "resolution", self.unet.config.sample_size) ** 2
        return config.max_area / native if config.max_area else 1.0

    def activation_bytes(self, config: EditConfig, embedding: torch.Tensor) -> int:
        """Bytes one training step saves for its backward pass at the native size: counted, not run, by
        tracing the real loss on fake tensors (shapes only, the device's own attention kernels), once per
        batch size and precision."""
        key = (config.train_batch_size, self.precision(config), config.gradient_checkpointing)
        if key not in self._activation_bytes:
            self._activation_bytes[key] = self._trace_activation_bytes(config, embedding)
        return self._activation_bytes[key]

    def _trace_activation_bytes(self, config: EditConfig, embedding: torch.Tensor) -> int:
        from torch._subclasses.fake_tensor import FakeTensorMode

        parameters = {id(p) for p in self.unet.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor):
            base = tensor._base if tensor._base is not None else tensor
            if id(base) not in parameters:
                saved[id(tensor)] = tensor.numel() * tensor.element_size()
            return tensor

        latents = torch.zeros(1, *self.training_shape(), device=self.device)
        noise, timesteps = self.training_draws(latents, 1, config, torch.Generator().manual_seed(0))
        frozen = [p for p in self.unet.parameters() if not p.requires_grad]  # traced as if trained: an upper bound
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        try:
            for p in frozen:
                p.requires_grad_(True)
            with FakeTensorMode(allow_non_fake_inputs=True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.denoising_loss(latents, embedding, noise[0], timesteps[0], config)
        finally:
            for p in frozen:
                p.requires_grad_(False)
            if config.gradient_checkpointing:
                self.unet.disable_gradient_checkpointing()
        return sum(saved.values())

    def training_shape(self) -> tuple[int, int, int]:
        """What the loss denoises (C, h, w) at the native size: the latents."""
        return self.draw_shape()

    def compute_dtype(self, config: EditConfig) -> torch.dtype:
        return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision(config)]

    def frozen_dtype(self, config: EditConfig) -> torch.dtype:
        """The base weights' dtype for an edit: the compute dtype when only LoRA trains, else fp32 (trained
        weights stay fp32 under autocast)."""
        return torch.float32 if config.finetune_method == "full" else self.compute_dtype(config)

    def prepare_weights(self, config: EditConfig) -> None:
        """The weights in the dtypes this edit runs with (before anything is trained)."""
        self.weights.set_frozen_dtype(self.frozen_dtype(config))

    def precision(self, config: EditConfig) -> str:
        """`auto`: bf16 on CUDA (the fast path), fp32 elsewhere."""
        if config.mixed_precision == "auto":
            return "bf16" if self.device.type == "cuda" else "no"
        return config.mixed_precision

    def autocast(self, config: EditConfig):
        precision = self.precision(config)
        if precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def check_fits(needs: dict[str, int], total: int, config: EditConfig) -> None:
    """ValueError, naming the parts, for an edit that needs more than 90 % of the card's `total` bytes."""
    if sum(needs.values()) > 0.9 * total:
        parts = ", ".join(f"{name} {size / 2**30:.1f}" for name, size in needs.items() if size)
        advice = ("set use_8bit_adam=true or finetune_method=lora (the default preset)"
                  if config.finetune_method == "full" else "use a GPU with more memory")
        raise ValueError(f"this edit needs about {sum(needs.values()) / 2**30:.1f} GiB ({parts} GiB); this GPU "
                         f"has {total / 2**30:.1f} GiB: {advice}")


def adam(params: list[torch.Tensor], lr: float, config: EditConfig, device: torch.device) -> torch.optim.Optimizer:
    if not config.use_8bit_adam:
        # Fused: one kernel for every parameter (CUDA); the default foreach kernels elsewhere.
        return torch.optim.Adam(params, lr=lr, fused=True if config.fused_adam and device.type == "cuda" else None)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError("use_8bit_adam needs bitsandbytes: pip install 'imagic-batch[cuda]'") from err
    return bnb.optim.Adam8bit(params, lr=lr)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 matmuls and convolutions on CUDA while an edit runs; the caller's settings after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
