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
from imagic.engine.tensors import cast_weights

LORA_ADAPTER = "imagic"


class UNetWeights:
    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.modified = False  # anything to undo: LoRA layers in place, or trained weights
        self._base_state: dict[str, torch.Tensor] | None = None
        self._fp32_copies: dict[int, dict[str, torch.Tensor]] = {}  # the loaded weights, while cast down
        self._lora_layers: list[torch.nn.Module] | None = None  # peft's layers, found once per adapter
        self._base_rows = 0  # while guidance shares one call: the leading samples that run without LoRA

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    @contextlib.contextmanager
    def lora_off_for_first(self, n: int) -> Iterator[None]:
        """While open, the first `n` samples of every UNet call run without LoRA (the base model) and the rest
        with it: peft's mixed-batch forward, so guidance's base and fine-tuned branches share one call. The
        hooks that say so are put on peft's layers once per adapter, not walked for every call."""
        if self._lora_layers is None:
            from peft.tuners.lora import LoraLayer

            self._lora_layers = [m for m in self.unet.modules() if isinstance(m, LoraLayer)]
            for layer in self._lora_layers:
                layer.register_forward_pre_hook(self._mixed_batch, with_kwargs=True)
        self._base_rows = n
        try:
            yield
        finally:
            self._base_rows = 0

    def _mixed_batch(self, module, args, kwargs):
        if not self._base_rows:
            return None
        rest = len(args[0]) - self._base_rows
        return args, {**kwargs, "adapter_names": ["__base__"] * self._base_rows + [LORA_ADAPTER] * rest}

    def set_frozen_dtype(self, dtype: torch.dtype) -> None:
        """The UNet's base weights in `dtype` while nothing is modified: the compute dtype when only LoRA
        trains under mixed precision, so that autocast does not cast every frozen weight on every call (and
        they take half the memory), as diffusers' LoRA scripts keep them; fp32 again, bit for bit, for an edit
        that trains them or computes in fp32."""
        if self.modified:
            raise RuntimeError("the UNet's dtype changes only between edits")
        if dtype != torch.float32:
            self._base_state = None  # a full fine-tune's snapshot is fp32: taken again when one needs it
        cast_weights(self.unet, dtype, self._fp32_copies)

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
            self._lora_layers = None  # gone with their hooks
        if self._base_state is not None:
            self.unet.load_state_dict(self._base_state)
        self.unet.requires_grad_(False)
        self.modified = False

    def recover(self) -> None:
        """After a failed edit: the UNet exactly as it was loaded, even with half-added LoRA layers."""
        self.modified = True
        if self.has_lora:
            self.unet.unload_lora()
        self._lora_layers, self._base_rows = None, 0
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


def lora_parameter_count(unet: torch.nn.Module, config: EditConfig) -> int:
    """The parameters LoRA of `config`'s rank adds on its target modules (peft: A maps a layer's input to the
    rank, B the rank to its output; a convolution's A keeps its kernel), counted without adding them."""
    count = 0
    for name, module in unet.named_modules():
        if not is_lora_target(name, config.lora_target_modules):
            continue
        if isinstance(module, torch.nn.Linear):
            count += config.lora_rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            count += config.lora_rank * (module.in_channels * kernel + module.out_channels)
    return count


def is_lora_target(name: str, targets) -> bool:
    """Whether the module `name` is one peft wraps for `targets` (a name or a dotted suffix of one)."""
    return any(name == t or name.endswith("." + t) for t in targets)
