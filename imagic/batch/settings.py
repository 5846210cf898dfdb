"""Operator settings: budgets per entry and which inputs a worker may read.

One pydantic-settings class, read from the environment of the process that runs the work (`IMAGIC_<NAME>`,
e.g. `IMAGIC_MAX_STEPS=3000`, `IMAGIC_ALLOWED_INPUTS=s3://datasets/,https://images.example.com/`) at its
edge — a CLI command, a flow run — and passed in; never from a manifest: a manifest in a shared bucket is
somebody else's input, and the operator decides what it may cost and touch.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MB = 2**20
ENV_PREFIX = "IMAGIC_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # Budgets, checked when a manifest is validated (imagic/batch/manifest.py) …
    max_steps: int = Field(5000, ge=1, description="Steps of each training stage.")
    max_images: int = Field(64, ge=1, description="η values × seeds of one entry.")
    max_batch_size: int = Field(64, ge=1, description="train_batch_size and render_batch_size.")
    max_inference_steps: int = Field(500, ge=1, description="DDIM steps of a render.")
    max_area: int = Field(2048 * 2048, ge=64 * 64, description="Pixels of the fitted input.")
    # … and while an entry runs (imagic/batch/run.py, imagic/io/inputs.py).
    entry_timeout_s: float = Field(3600.0, gt=0, description="Wall seconds of one entry's edit.")
    max_input_bytes: int = Field(128 * MB, ge=1, description="Bytes of one input read (and its memory).")
    input_timeout_s: float = Field(60.0, gt=0, description="Seconds to read one input, connect included.")
    # Preemptible GPUs: a stopped entry resumes from its last checkpoint (imagic/engine/checkpoints.py).
    checkpoint_every_steps: int = Field(200, ge=0, description="Training steps between an entry's saved "
                                        "checkpoints (0: saved only when stopped): what a GPU lost without "
                                        "warning redoes at most.")
    # Cost in reports: each image's share of its chunk's GPU time, priced.
    gpu_hour_price: float | None = Field(None, ge=0, description="Price of one GPU-hour (any currency), for "
                                         "cost per image in reports; unset: GPU-seconds only.")
    allowed_inputs: Annotated[list[str] | None, NoDecode] = Field(
        None, description="URI prefixes inputs may start with (`s3://bucket/`, `https://host/`, `file:` for local "
        "paths), comma-separated. Unset: every input in local mode (the user's own machine), `s3://` only in "
        "deployment mode.")

    @field_validator("allowed_inputs", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def from_env(cls, mode: Literal["local", "deployment"] = "local") -> Settings:
        """The settings of this process, for work run in `mode`."""
        settings = cls()
        if mode == "deployment" and settings.allowed_inputs is None:
            return settings.model_copy(update={"allowed_inputs": ["s3://"]})
        return settings

    def bounded_by(self, manifest_uri: str) -> Settings:
        """These settings for a manifest read from `manifest_uri`: unless the operator set `allowed_inputs`, a
        manifest from a bucket may name only objects in S3, one from a web server only that server's — never
        this machine's files or an internal service (whoever wrote a shared manifest is not this machine's
        user)."""
        if self.allowed_inputs is not None or "://" not in manifest_uri or manifest_uri.startswith("file://"):
            return self
        if manifest_uri.startswith("s3://"):
            return self.model_copy(update={"allowed_inputs": ["s3://"]})
        parts = urlsplit(manifest_uri)
        return self.model_copy(update={"allowed_inputs": [f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"]})

    @classmethod
    def defaults(cls) -> Settings:
        """The built-in settings, whatever the environment says (what a library call gets when none is passed)."""
        return cls.model_construct()

    @staticmethod
    def env_name(field: str) -> str:
        """The environment variable that sets `field`, for messages that tell the operator what to change."""
        return f"{ENV_PREFIX}{field.upper()}"

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
        return [f"{what}: {value} is over the limit of {limit} (operator setting {self.env_name(setting)})"
                for what, value, limit, setting in checks if value > limit]

    def input_allowed(self, uri: str) -> bool:
        if self.allowed_inputs is None:
            return True
        local = "://" not in uri or uri.startswith("file://")
        return any(("file:" == prefix and local) or (prefix != "file:" and uri.startswith(prefix))
                   for prefix in self.allowed_inputs)
