"""Operator settings: budgets per entry and which inputs a worker may read.

They come from the environment of the process that runs the work (`IMAGIC_<NAME>`, e.g.
`IMAGIC_MAX_STEPS=3000`, `IMAGIC_ALLOWED_INPUTS=s3://datasets/,https://images.example.com/`), never from a
manifest: a manifest in a shared bucket is somebody else's input, and the operator decides what it may cost
and touch.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field

MB = 2**20


class Settings(BaseModel):
    # Budgets, checked when a manifest is validated (imagic/manifest.py) …
    max_steps: int = Field(5000, ge=1, description="Steps of each training stage.")
    max_images: int = Field(64, ge=1, description="η values × seeds of one entry.")
    max_batch_size: int = Field(64, ge=1, description="train_batch_size and render_batch_size.")
    max_inference_steps: int = Field(500, ge=1, description="DDIM steps of a render.")
    max_area: int = Field(2048 * 2048, ge=64 * 64, description="Pixels of the fitted input.")
    # … and while an entry runs (imagic/batch.py, imagic/storage.py).
    entry_timeout_s: float = Field(3600.0, gt=0, description="Wall seconds of one entry's edit.")
    max_input_bytes: int = Field(128 * MB, ge=1, description="Bytes of one input read (and its memory).")
    input_timeout_s: float = Field(60.0, gt=0, description="Seconds to read one input, connect included.")
    # Which inputs may be read: URI prefixes (`s3://bucket/`, `https://host/`, `file:` for local paths).
    # None: every input (the default in local mode: the user's own machine); in deployment mode the
    # default is `s3://` only (flows/edit_chunk.py).
    allowed_inputs: list[str] | None = None

    @classmethod
    def from_env(cls, mode: Literal["local", "deployment"] = "local") -> Settings:
        values: dict = {}
        for name, field in cls.model_fields.items():
            raw = os.environ.get(f"IMAGIC_{name.upper()}")
            if raw is None:
                continue
            values[name] = [p.strip() for p in raw.split(",") if p.strip()] if name == "allowed_inputs" else raw
        if mode == "deployment" and "allowed_inputs" not in values:
            values["allowed_inputs"] = ["s3://"]
        return cls(**values)

    def budget_problems(self, config, etas, seeds) -> list[str]:
        """What an entry asks beyond the budgets, one line each, naming the setting that allows more."""
        checks = [
            ("embedding_steps", config.embedding_steps, self.max_steps, "max_steps"),
            ("finetune_steps", config.finetune_steps, self.max_steps, "max_steps"),
            ("sr_finetune_steps", config.sr_finetune_steps or 0, self.max_steps, "max_steps"),
            ("num_inference_steps", config.num_inference_steps, self.max_inference_steps, "max_inference_steps"),
            ("sr_num_inference_steps", config.sr_num_inference_steps, self.max_inference_steps, "max_inference_steps"),
            ("train_batch_size", config.train_batch_size, self.max_batch_size, "max_batch_size"),
            ("render_batch_size", config.render_batch_size, self.max_batch_size, "max_batch_size"),
            ("etas × seeds", len(etas) * len(seeds), self.max_images, "max_images"),
            ("max_area", config.max_area or 0, self.max_area, "max_area"),
        ]
        return [f"{what}: {value} is over the limit of {limit} (operator setting IMAGIC_{setting.upper()})"
                for what, value, limit, setting in checks if value > limit]

    def input_allowed(self, uri: str) -> bool:
        if self.allowed_inputs is None:
            return True
        local = "://" not in uri or uri.startswith("file://")
        return any(("file:" == prefix and local) or (prefix != "file:" and uri.startswith(prefix))
                   for prefix in self.allowed_inputs)
