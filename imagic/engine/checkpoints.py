"""Where an edit's training stands, so that a stopped edit (a spot GPU reclaimed) resumes where it stopped.

Every training stage is one `Denoiser.optimize` loop (stage A on e_opt, stage B on the UNet's trainable
weights, a cascade's SR model too). `Checkpoints` keeps, per loop, the step reached, the trained tensors, Adam's
state and the losses; the loop saves it every `every_steps` steps and when asked to stop (`should_stop`,
e.g. after SIGTERM), then raises `Preempted`. Given what was saved, a new edit of the same request skips the
finished loops and continues the unfinished one from its step — with the same result as an edit never
stopped: every loop still draws its noise from the seeded generator, so the draws after it are the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors


class Preempted(Exception):
    """The edit stopped at a training step because it was asked to; what it had is saved."""


@dataclass
class LoopState:
    """One training loop after `step` of its steps."""

    step: int
    params: list[torch.Tensor]  # on the CPU, in the loop's parameter order
    optimizer: dict  # Adam's state_dict, tensors on the CPU
    losses: list[float] = field(default_factory=list)


class Checkpoints:
    def __init__(self, *, every_steps: int = 0, save: Callable[[Checkpoints], None] | None = None,
                 should_stop: Callable[[], bool] = lambda: False, loops: dict[str, LoopState] | None = None):
        self.every_steps, self.save, self.should_stop = every_steps, save, should_stop
        self.loops: dict[str, LoopState] = dict(loops or {})
        self.resumed = {name: loop.step for name, loop in self.loops.items()}  # what this edit did not redo

    def start(self, name: str, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """(the step to continue after, the losses so far): 0 and [] for a loop not saved before."""
        saved = self.loops.get(name)
        if saved is None:
            return 0, []
        if len(saved.params) != len(params) or any(a.shape != b.shape for a, b in zip(saved.params, params)):
            raise ValueError(f"the saved state of {name} does not fit this model's trainable weights")
        with torch.no_grad():
            for param, value in zip(params, saved.params):
                param.copy_(value.to(param.device, param.dtype))
        optimizer.load_state_dict(saved.optimizer)
        return saved.step, list(saved.losses)

    def after_step(self, name: str, step: int, steps: int, params: list[torch.Tensor],
                   optimizer: torch.optim.Optimizer, losses: Callable[[], list[float]]) -> None:
        """Save every `every_steps` steps and at the last; stop (`Preempted`) when asked to."""
        if self.save is None:  # nowhere to keep it: nothing to resume, nothing copied
            return
        stop = self.should_stop()
        if not (stop or step == steps or (self.every_steps and step % self.every_steps == 0)):
            return
        self.loops[name] = LoopState(step, [p.detach().cpu().clone() for p in params],
                                     _to_cpu(optimizer.state_dict()), losses())
        if stop or step < steps:  # a finished loop is saved with the next one
            self.save(self)
        if stop:
            raise Preempted(f"stopped at step {step} of {steps} of {name}, as asked")

    # ------------------------------------------------------------------ as bytes (safetensors only)

    def to_bytes(self) -> bytes:
        tensors, meta = {}, {}
        for name, loop in self.loops.items():
            for i, param in enumerate(loop.params):
                tensors[f"{name}/param/{i}"] = param.contiguous()
            state = {}
            for index, values in loop.optimizer["state"].items():
                for key, value in values.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{name}/adam/{index}/{key}"] = value.contiguous()
                    else:
                        state.setdefault(str(index), {})[key] = value
            meta[name] = {"step": loop.step, "losses": loop.losses, "params": len(loop.params),
                          "param_groups": loop.optimizer["param_groups"], "state": state}
        return save_tensors(tensors, metadata={"checkpoints": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes, **kwargs) -> Checkpoints:
        tensors = load_tensors(data)
        meta = json.loads(_metadata(data)["checkpoints"])
        loops = {}
        for name, info in meta.items():
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                parts = key.split("/")
                if parts[0] == name and parts[1] == "adam":
                    state.setdefault(int(parts[2]), {})[parts[3]] = value
            for index, values in info["state"].items():
                state.setdefault(int(index), {}).update(values)
            loops[name] = LoopState(info["step"], [tensors[f"{name}/param/{i}"] for i in range(info["params"])],
                                    {"state": state, "param_groups": info["param_groups"]}, info["losses"])
        return cls(loops=loops, **kwargs)


def _to_cpu(state: dict) -> dict:
    return {"state": {i: {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": json.loads(json.dumps(state["param_groups"]))}


def _metadata(data: bytes) -> dict:
    """The safetensors header's `__metadata__` (8 bytes of length, then the JSON header)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})
