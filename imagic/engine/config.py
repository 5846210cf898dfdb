"""One config model for an edit; a preset is just a named set of defaults."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagic.engine.builtins import Family, model_family, tuned_selection

LORA_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# peft wraps Conv2d too: the ResNet convolutions and the transformer blocks' in/out projections.
LORA_CONVOLUTION = ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out")
# DeepFloyd IF's attention has no transformer blocks: the text enters through add_k_proj / add_v_proj.
IF_ATTENTION = LORA_ATTENTION + ("add_k_proj", "add_v_proj")
IF_CONVOLUTION = ("conv1", "conv2", "conv_shortcut")


class EditConfig(BaseModel):
    """Everything that decides what an edit computes. Saved with every result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The input as the model sees it (imagic/engine/images.py: fit_image).
    fit: Literal["keep", "crop", "pad"] = Field(
        "keep", description="keep: the input's aspect ratio at about max_area; crop / pad: the model's square."
    )
    max_area: int | None = Field(
        None, ge=64 * 64, le=2048 * 2048, description="Pixels of the fitted input (fit=keep); default the model's native area."
    )
    output_size: Literal["input", "model"] = Field(
        "input", description="input: every output at the input's size and aspect (a dataset's boxes and masks "
        "still fit); model: at the size the model rendered it."
    )
    # Stage 1: text-embedding optimisation (model frozen).
    embedding_steps: int = Field(500, ge=0, description="Adam steps on e_opt.")
    embedding_lr: float = Field(1e-3, gt=0)
    # Stage 2: model fine-tuning with e_opt fixed.
    finetune_method: Literal["full", "lora"] = "full"
    finetune_steps: int = Field(1000, ge=0)
    finetune_lr: float = Field(2e-6, gt=0)
    lora_rank: int = Field(8, ge=1, description="LoRA rank (finetune_method='lora').")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; defaults to the rank (scale 1).")
    lora_target_modules: tuple[str, ...] = LORA_ATTENTION
    # Both training stages.
    train_batch_size: int = Field(1, ge=1, description="Noise/timestep draws averaged per step.")
    seed: int = Field(0, ge=0, description="Seeds every training noise and timestep draw.")
    # Stage 3: rendering.
    guidance_scale: float = Field(7.5, ge=1.0)
    num_inference_steps: int = Field(50, ge=1)
    render_batch_size: int = Field(8, ge=1, description="(η, seed) images per batched UNet call.")
    # Stage 3 anchoring: what keeps the edit where the input is (imagic/engine/anchoring.py).
    render_start: Literal["noise", "inversion", "ddpm_inversion"] = Field(
        "noise", description="Start from seed noise (the paper), from the DDIM inversion of the input, or from "
        "its edit-friendly DDPM inversion (noise maps per seed that give the input back at η=0)."
    )
    inversion_strength: float = Field(
        1.0, gt=0, le=1, description="Share of the trajectory inverted and re-rendered (1: all; less keeps more)."
    )
    inversion_noise: float = Field(
        0.0, ge=0, lt=1, description="Share of seed noise mixed into the inverted start (variance kept)."
    )
    anchor_fraction: float = Field(0.0, ge=0, le=1, description="First share of the steps conditioned on e_opt.")
    attention_injection: float = Field(
        0.0, ge=0, le=1, description="First share of the steps in which edits use an η=0 branch's self-attention."
    )
    mask_threshold: float = Field(
        0.0, ge=0, lt=1, description="Edit only where e_tgt and e_opt disagree above this share (0: off)."
    )
    negative_embedding: Literal["empty", "e_opt"] = Field(
        "empty", description="Guidance's negative branch: the empty text (the paper) or e_opt (the input)."
    )
    unconditional_model: Literal["finetuned", "base"] = Field(
        "finetuned", description="Which UNet gives classifier-free guidance its unconditional branch."
    )
    # Scores and the automatic choice (imagic/engine/scores.py, selection.py).
    score_outputs: bool = Field(True, description="Score every output (edit, fidelity) and select one.")
    fidelity: Literal["edges", "edges_coarse", "edges_multiscale", "silhouette", "silhouette_and_edges"] = Field(
        "edges", description="The fidelity score (imagic/engine/scores.py): edge maps' correlation at one blur or "
        "three; the subject's silhouette against the image border; or silhouette and edges averaged."
    )
    clip_model: str | None = Field(None, description="CLIP hub id or directory: adds clip scores (optional).")
    select_min_edit: float = Field(0.55, description="Least edit score a selected output has.")
    select_min_fidelity: float = Field(0.9, description="Least fidelity score a selected output has.")
    select_min_reconstruction: float = Field(0.8, description="Least fidelity of the η=0 render to the input.")
    select_fidelity: Literal["absolute", "relative"] = Field(
        "absolute", description="relative: an output's fidelity is divided by the η=0 render's own before the "
        "threshold, so what the VAE and the inversion lose on every output is not held against the edit."
    )
    # Devices and precision. `auto` is the fast path: bf16 autocast on CUDA, fp32 on the CPU.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    tf32: bool = Field(True, description="CUDA: TF32 matmuls and convolutions for what runs in fp32.")
    fused_adam: bool = Field(True, description="CUDA: Adam's fused kernel (one launch for all parameters).")
    loss_readback_steps: int = Field(
        25, ge=1, description="Read the loss back to the host every N steps (each read waits for the GPU)."
    )
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    save_full_delta: bool = Field(False, description="Keep the full fine-tune's weight delta (UNet-sized).")
    # A cascade's super-resolution model (imagic/engine/cascade.py): fine-tuned on the input at e_tgt (the paper's
    # §3.3), then it upsamples every render at e_tgt. Single-model pipelines refuse these set otherwise.
    sr_finetune_steps: int | None = Field(None, ge=0, description="SR model fine-tune steps (default finetune_steps).")
    sr_finetune_lr: float | None = Field(None, gt=0, description="SR model fine-tune lr (default finetune_lr).")
    sr_noise_level: int = Field(
        250, ge=0, lt=1000, description="Noise augmentation level of the SR model's low-res input (IF-II: 250)."
    )
    sr_guidance_scale: float = Field(4.0, ge=1.0, description="SR model guidance (IF-II: 4).")
    sr_num_inference_steps: int = Field(50, ge=1, description="SR model DDIM steps.")
    sr_strength: float = Field(
        1.0, gt=0, le=1, description="Share of the SR trajectory run: 1 starts from noise (IF's way); less starts "
        "from the upsampled base render, noised to that level (fewer steps, closer to the render)."
    )

    @model_validator(mode="after")
    def _check_lora_only_options(self) -> EditConfig:
        if self.finetune_method == "full" and self.lora_alpha is not None:
            raise ValueError("lora_alpha is set but finetune_method is 'full'")
        if self.render_start == "noise" and (self.inversion_strength != 1.0 or self.inversion_noise != 0.0):
            raise ValueError("inversion_strength and inversion_noise need render_start='inversion' or 'ddpm_inversion'")
        if self.render_start == "ddpm_inversion" and self.inversion_noise != 0.0:
            raise ValueError("inversion_noise is for render_start='inversion': with 'ddpm_inversion' each seed draws "
                             "its own noise maps")
        if self.render_start == "noise" and self.mask_threshold > 0:
            raise ValueError("mask_threshold needs an inverted start (render_start='inversion' or 'ddpm_inversion'): "
                             "it keeps the input's own trajectory outside the mask")
        return self


SR_OPTIONS = tuple(name for name in EditConfig.model_fields if name.startswith("sr_"))  # a cascade's only


PRESETS: dict[str, dict[str, Any]] = {
    # Kawar et al. 2023, Stable Diffusion recipe.
    "paper": dict(embedding_steps=1000, embedding_lr=2e-3, finetune_method="full", finetune_steps=1500, finetune_lr=5e-7),
    # diffusers' community Imagic pipeline defaults.
    "community": dict(embedding_steps=500, embedding_lr=1e-3, finetune_method="full", finetune_steps=1000, finetune_lr=2e-6),
    # LoRA fine-tune with fewer steps; lr and timestep batch from the toy benchmark (README).
    "fast": dict(
        embedding_steps=200, embedding_lr=5e-3, finetune_method="lora", finetune_steps=300, finetune_lr=3e-4,
        lora_rank=8, train_batch_size=4,
    ),
    # LoRA on the convolutions too, a third of `fast`'s fine-tune steps, rendered from the edit-friendly DDPM
    # inversion of the input over its last 80 % of steps (LEDITS++'s skip) with the base model's unconditional
    # branch: edits stay in place, each seed is another candidate, and the fine-tune needs fewer steps when the
    # noise maps already hold the input (toy benchmark, README: 8 tuning cases, 0.81× `fast`'s time).
    "anchored": dict(
        embedding_steps=200, embedding_lr=5e-3, finetune_method="lora", finetune_steps=100, finetune_lr=3e-4,
        lora_rank=8, train_batch_size=4, lora_target_modules=LORA_ATTENTION + LORA_CONVOLUTION,
        render_start="ddpm_inversion", inversion_strength=0.8, unconditional_model="base", guidance_scale=3.0,
    ),
}
# A cascade (base + super-resolution: DeepFloyd IF, the paper's Imagen setting) has its own recipes.
CASCADE_PRESETS: dict[str, dict[str, Any]] = {
    # Kawar et al. 2023, §3.3 and Appendix B, Imagen recipe: 100 embedding steps (1000 were no better), base and
    # SR fine-tuned for 1500 steps each, rendered with IF's own step counts. The issue quotes no fine-tune lr;
    # 2e-6 is the one diffusers' community Imagic pipeline took from the paper's Imagen runs.
    "paper": dict(embedding_steps=100, embedding_lr=1e-3, finetune_method="full", finetune_steps=1500, finetune_lr=2e-6,
                  sr_finetune_steps=1500, num_inference_steps=100, guidance_scale=7.0),
    # LoRA on both models with `fast`'s steps. The embedding stage is `fast`'s too: with the paper's 100 steps
    # at 1e-3 the toy cascade's e_opt stays within 7 % of e_tgt, and the fine-tune then ties the input to the
    # target text itself (anchored renders never edit: 0 of 6 tuning cases; with these, 5 of 6 right and in place).
    "fast": dict(
        embedding_steps=200, embedding_lr=5e-3, finetune_method="lora", finetune_steps=300, finetune_lr=3e-4,
        lora_rank=8, train_batch_size=4, lora_target_modules=IF_ATTENTION, guidance_scale=7.0,
    ),
    # `fast` rendered from the inversion of the input with the base model's unconditional branch.
    "anchored": dict(
        embedding_steps=200, embedding_lr=5e-3, finetune_method="lora", finetune_steps=300, finetune_lr=3e-4,
        lora_rank=8, train_batch_size=4, lora_target_modules=IF_ATTENTION + IF_CONVOLUTION,
        render_start="inversion", unconditional_model="base", guidance_scale=3.0,
    ),
}
DEFAULT_PRESET = "anchored"
PRESETS_BY_FAMILY: dict[str, dict[str, dict[str, Any]]] = {"single": PRESETS, "cascade": CASCADE_PRESETS}


def make_config(preset: str = DEFAULT_PRESET, family: Family | None = None, *, model: str | None = None,
                **overrides: Any) -> EditConfig:
    """The preset's defaults for this model family with `overrides` on top, validated. Given the `model`, its
    family's table applies and the selection thresholds are the ones tuned for it (imagic/engine/builtins.py);
    without one, the preset's alone."""
    family = family or model_family(model)
    presets = PRESETS_BY_FAMILY[family]
    if preset not in presets:
        model = " for a cascade (base+super_resolution)" if family == "cascade" else ""
        raise ValueError(f"unknown preset {preset!r}{model}; choose one of {', '.join(presets)}")
    selection = tuned_selection(model, preset) if model is not None else {}
    return EditConfig(**{**presets[preset], **selection, **overrides})
