"""What an edit produces, the names of its files, and how it is saved (PNG + safetensors + JSON) and loaded back."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from imagic.engine.config import EditConfig
from imagic.engine.selection import Selection

if TYPE_CHECKING:  # torch and safetensors load with what saves or loads tensors: the file names stay light
    import torch

ARTIFACTS = "artifacts"
EMBEDDINGS_FILE = "embeddings.safetensors"
DELTA_FILE = "delta.safetensors"
EDIT_FILE = "edit.json"
INPUT_FILE = "input.png"
SELECTED_FILE = "selected.png"


def image_name(eta: float, seed: int) -> str:
    """`eta-0.70_seed-0.png`; more decimals only when η needs them, so names never collide."""
    text = f"{eta:.2f}" if round(eta, 2) == eta else repr(float(eta))
    return f"eta-{text}_seed-{seed}.png"


@dataclass
class EditResult:
    target_text: str
    config: EditConfig
    input_image: Image.Image  # the input at the outputs' size: as given (output_size=input), or as fitted
    images: dict[tuple[float, int], Image.Image]  # (η, seed) → image
    e_tgt: torch.Tensor  # (1, L, D)
    e_opt: torch.Tensor  # (1, L, D)
    delta: dict[str, torch.Tensor] | None  # LoRA weights, or trained − base (full); None if not kept
    losses: dict[str, list[float]] = field(default_factory=dict)  # stage → per-step loss
    seconds: dict[str, float] = field(default_factory=dict)  # stage → wall seconds
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    scores: dict[tuple[float, int], dict] = field(default_factory=dict)  # (η, seed) → {"edit", "fidelity"}
    reconstruction_fidelity: float | None = None  # fidelity of the η=0 render to the input
    selection: Selection | None = None
    input_transform: dict = field(default_factory=dict)  # what was done to the input (imagic.images.fit_image)
    stages: list[dict] = field(default_factory=list)  # each model of the edit: its input size, what it trained on

    @property
    def etas(self) -> list[float]:
        return sorted({eta for eta, _ in self.images})

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for _, seed in self.images})

    def summary(self) -> dict:
        """JSON-ready description of the edit (no tensors, no pixels)."""
        return {
            "target_text": self.target_text,
            "config": self.config.model_dump(mode="json"),
            "input_transform": self.input_transform,
            "stages": self.stages,
            "etas": self.etas,
            "seeds": self.seeds,
            "images": {image_name(eta, seed): {"eta": eta, "seed": seed} for eta, seed in self.images},
            "losses": self.losses,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "has_delta": self.delta is not None,
            "scores": [{"eta": eta, "seed": seed, **s} for (eta, seed), s in sorted(self.scores.items())],
            "reconstruction_fidelity": self.reconstruction_fidelity,
            "selection": self.selection.to_json() if self.selection else None,
        }

    def to_files(self) -> dict[str, bytes]:
        """Everything `save` writes, as {relative path: bytes}: images, artifacts/ (embeddings, delta, JSON)."""
        from safetensors.torch import save as save_tensors

        files = {INPUT_FILE: png_bytes(self.input_image)}
        for (eta, seed), image in sorted(self.images.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            files[image_name(eta, seed)] = png_bytes(image)
        if self.selection is not None and self.selection.verdict == "selected":
            files[SELECTED_FILE] = png_bytes(self.images[(self.selection.eta, self.selection.seed)])
        tensors = {"e_tgt": self.e_tgt.contiguous(), "e_opt": self.e_opt.contiguous()}
        files[f"{ARTIFACTS}/{EMBEDDINGS_FILE}"] = save_tensors(tensors)
        if self.delta is not None:
            delta = {k: v.contiguous() for k, v in self.delta.items()}
            files[f"{ARTIFACTS}/{DELTA_FILE}"] = save_tensors(delta, metadata={"finetune_method": self.config.finetune_method})
        files[f"{ARTIFACTS}/{EDIT_FILE}"] = (json.dumps(self.summary(), indent=2) + "\n").encode()
        return files

    def save(self, directory: str | Path) -> list[Path]:
        """Write images, `artifacts/` (embeddings, delta) and `artifacts/edit.json`; return the paths."""
        directory = Path(directory)
        (directory / ARTIFACTS).mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in self.to_files().items():
            (directory / name).write_bytes(data)
            written.append(directory / name)
        return written

    @classmethod
    def load(cls, directory: str | Path) -> EditResult:
        """Read back what `save` wrote (images that are missing are simply not loaded)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        artifacts = directory / ARTIFACTS
        if not (artifacts / EDIT_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no {ARTIFACTS}/{EDIT_FILE}; not a saved edit")
        summary = json.loads((artifacts / EDIT_FILE).read_text())
        embeddings = load_file(artifacts / EMBEDDINGS_FILE)
        delta = load_file(artifacts / DELTA_FILE) if summary["has_delta"] else None
        images = {}
        for name, key in summary["images"].items():
            if (directory / name).is_file():
                images[(key["eta"], key["seed"])] = _open(directory / name)
        return cls(
            target_text=summary["target_text"],
            config=EditConfig(**summary["config"]),
            input_image=_open(directory / INPUT_FILE),
            images=images,
            e_tgt=embeddings["e_tgt"],
            e_opt=embeddings["e_opt"],
            delta=delta,
            losses=summary["losses"],
            seconds=summary["seconds"],
            peak_memory_bytes=summary["peak_memory_bytes"],
            scores={(s["eta"], s["seed"]): {k: v for k, v in s.items() if k not in ("eta", "seed")}
                    for s in summary.get("scores", [])},
            reconstruction_fidelity=summary.get("reconstruction_fidelity"),
            selection=Selection(**summary["selection"]) if summary.get("selection") else None,
            input_transform=summary.get("input_transform", {}),
            stages=summary.get("stages", []),
        )


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
