"""One UNet's weights across many edits: what stage B trains, the delta it leaves, and the way back.

An editor loads its model once and edits image after image, so every edit must end with the base weights
back bit for bit: a LoRA fine-tune adds adapter layers (peft) and removes them after; a full fine-tune is
undone from a snapshot of the base weights taken before the first one. A failed edit can leave anything
behind (half-added adapters, trained weights): `recover` puts the UNet back exactly as it was loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from imagic.engine.config import EditConfig

LORA_ADAPTER = "imagic"


class UNetWeights:
    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.modified = False  # anything to undo: LoRA layers in place, or trained weights
        self._base_state: dict[str, torch.Tensor] | None = None

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    @contextlib.contextmanager
    def lora_off_for_first(self, n: int) -> Iterator[None]:
        """While open, the first `n` samples of every UNet call run without LoRA (the base model) and the rest
        with it: peft's mixed-batch forward, so guidance's base and fine-tuned branches share one call."""
        from peft.tuners.lora import LoraLayer

        def hook(module, args, kwargs):
            rest = len(args[0]) - n
            return args, {**kwargs, "adapter_names": ["__base__"] * n + [LORA_ADAPTER] * rest}

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self.unet.modules()
                   if isinstance(m, LoraLayer)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def base_state(self) -> dict[str, torch.Tensor]:
        """The base weights. Taken once, on first need, before any edit touches them: a copy the UNet's
        size, kept on the UNet's device (on a GPU, restoring and `unconditional_model=base` never cross PCIe)."""
        if self._base_state is None:
            self._base_state = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        return self._base_state

    def trainable(self, config: EditConfig) -> list[torch.Tensor]:
        """The parameters stage B trains: new LoRA weights, or every UNet weight (its base kept first)."""
        self.modified = True
        if config.finetune_method == "lora":
            self.add_lora(config)
            return [p for p in self.unet.parameters() if p.requires_grad]
        self.base_state()
        self.unet.requires_grad_(True)
        return list(self.unet.parameters())

    def trained_delta(self, config: EditConfig) -> dict[str, torch.Tensor] | None:
        """After stage B: the LoRA weights, or trained − base for a full fine-tune when `save_full_delta` (else
        None: a UNet-sized difference is not computed for nothing). A full delta is put back in place as
        base + delta, exactly what a later render-only run reconstructs."""
        self.unet.requires_grad_(False)
        if config.finetune_method == "lora":
            return {name: p.detach().cpu().clone() for name, p in self.unet.named_parameters() if "lora_" in name}
        if not config.save_full_delta:
            return None
        base = self.base_state()
        delta = {name: (p.detach() - base[name]).cpu() for name, p in self.unet.named_parameters()}
        self.apply_delta(delta, config)
        return delta

    def apply_delta(self, delta: dict[str, torch.Tensor], config: EditConfig) -> None:
        """Put an edit's fine-tuned weights in place: LoRA weights, or base + delta for a full fine-tune."""
        self.modified = True
        with torch.no_grad():
            if config.finetune_method == "lora":
                self.add_lora(config)
                params = {name: p for name, p in self.unet.named_parameters() if "lora_" in name}
                if set(params) != set(delta):
                    raise ValueError(
                        f"LoRA delta does not fit this model ({len(set(delta) - set(params))} unexpected, "
                        f"{len(set(params) - set(delta))} missing weights)"
                    )
            else:
                base = self.base_state()
                params = dict(self.unet.named_parameters())
                if set(params) != set(delta):
                    raise ValueError("weight delta does not fit this model's UNet")
                delta = {name: base[name] + d.to(base[name].device) for name, d in delta.items()}
            for name, value in delta.items():
                params[name].copy_(value)
        self.unet.requires_grad_(False)

    def add_lora(self, config: EditConfig) -> None:
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

    def restore(self) -> None:
        """Base weights back, bit for bit, and no LoRA layers left."""
        if not self.modified:
            return
        if self.has_lora:
            self.unet.unload_lora()
        if self._base_state is not None:
            self.unet.load_state_dict(self._base_state)
        self.unet.requires_grad_(False)
        self.modified = False

    def recover(self) -> None:
        """After a failed edit: the UNet exactly as it was loaded, even with half-added LoRA layers."""
        self.modified = True
        if self.has_lora:
            self.unet.unload_lora()
        strip_lora_layers(self.unet)
        if hasattr(self.unet, "_hf_peft_config_loaded"):  # diffusers' flag that an adapter is loaded
            self.unet._hf_peft_config_loaded = False
        self.restore()


def strip_lora_layers(model: torch.nn.Module) -> None:
    """Put back the original module wherever a peft layer wraps one (what a failed add_adapter leaves)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).get_base_layer())


def finetune_bytes(unet: torch.nn.Module, config: EditConfig) -> int:
    """fp32 weights, gradients, the base snapshot and Adam's two moments (fp32, or 1 byte each in 8-bit)."""
    return sum(p.numel() for p in unet.parameters()) * (4 + 4 + 4 + (2 if config.use_8bit_adam else 8))
