"""The built-in models, in one table: what `--model toy` and friends are, for every layer that asks.

Config reads a model's family (which preset table applies), loading reads where its weights come from,
the CLI lists the names, and the batch layer asks whether the toy oracle can read its outputs. Plain data
(and where the shipped ones live), no torch: so `imagic --help` and manifest validation stay instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imagic.engine.errors import ModelError

Family = Literal["single", "cascade"]
CASCADE_SEPARATOR = "+"  # a cascade is written `base+super_resolution`
CASCADE_FOLDERS = ("base", "super_resolution")  # a cascade saved as one folder: its two pipelines side by side


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    family: Family
    description: str
    # Trained and shipped in the package (`imagic/<package_folder>/`), or built in code by `builder`
    # (`imagic.toy.tiny.<builder>`) with random weights on first use.
    package_folder: str | None = None
    training_script: str | None = None  # `python -m imagic.toy.<script>` rebuilds the shipped weights
    builder: str | None = None
    oracle: bool = False  # drawn from the toy world: `imagic.toy.measure` reads its outputs (toy metrics)
    # Per preset, the selection thresholds chosen for this model on the toy benchmark's tuning split
    # (`benchmarks/toy_edits.py --tune`); a preset not named here, and every other model, gets the relative rule.
    selection: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def folders(self) -> tuple[str, ...]:
        """The pipeline folders inside its directory: one at the root, or a cascade's two."""
        return CASCADE_FOLDERS if self.family == "cascade" else ("",)


BUILTIN_MODELS: dict[str, BuiltinModel] = {model.name: model for model in (
    BuiltinModel("toy", "single", "SD-architecture, trained on the toy world (the default)", package_folder="toy/model",
                 training_script="train", oracle=True,
                 # benchmarks/results/toy_edits_tuning16.json: precision 1.0 at coverage 0.25 (16 tuning cases).
                 selection={"anchored": {"select_min_edit": 0.6, "select_min_fidelity": 0.85}}),
    BuiltinModel("toy-if", "cascade", "DeepFloyd-IF-shaped cascade, trained on the toy world",
                 package_folder="toy/cascade", training_script="train_cascade", oracle=True),
    BuiltinModel("tiny", "single", "SD-shaped, random weights (plumbing tests)", builder="build_tiny_pipeline"),
    BuiltinModel("tiny-xl", "single", "SDXL-shaped, random weights", builder="build_tiny_xl_pipeline"),
    BuiltinModel("tiny-if", "cascade", "DeepFloyd-IF-cascade-shaped, random weights", builder="build_tiny_if_cascade"),
)}
DEFAULT_MODEL = "toy"  # what runs when no model is named


def model_family(model: str | None) -> Family:
    """`cascade` for a model written base+super_resolution (or a built-in cascade), else `single`: what
    decides which preset table an entry's preset comes from. No I/O: the load checks the rest."""
    model = model or DEFAULT_MODEL
    if CASCADE_SEPARATOR in model:
        return "cascade"
    return BUILTIN_MODELS[model].family if model in BUILTIN_MODELS else "single"


def tuned_selection(model: str | None, preset: str) -> dict:
    """The selection thresholds tuned for `preset` on this built-in model, or, for any other model and preset,
    the relative rule: no tuning split exists for it, so fidelity is judged against its own η=0 render."""
    builtin = BUILTIN_MODELS.get(model or DEFAULT_MODEL)
    if builtin is not None and preset in builtin.selection:
        return dict(builtin.selection[preset])
    return {"select_fidelity": "relative"}


def has_oracle(model: str) -> bool:
    """Whether the toy oracle can read this model's outputs (a model trained on the toy world)."""
    return model in BUILTIN_MODELS and BUILTIN_MODELS[model].oracle


def shipped_folders(builtin: BuiltinModel) -> list[Path] | None:
    """The pipeline folders of a built-in model shipped in the package (None for one built in code)."""
    if builtin.package_folder is None:
        return None
    directory = Path(__file__).parents[1] / builtin.package_folder
    if not all((directory / part / "model_index.json").is_file() for part in builtin.folders):
        raise ModelError(f"the {builtin.name} model is not in this installation ({directory}); "
                         f"train it with: python -m imagic.toy.{builtin.training_script}")
    return [directory / part if part else directory for part in builtin.folders]


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
REVISION = re.compile(r"[\w.-]+(/[\w.-]+)*")  # a commit sha, a branch or tag, refs/pr/N


def split_revision(model: str) -> tuple[str, str | None]:
    """A hub id pinned to a revision, `org/name@revision`, as (`org/name`, `revision`); anything else (a
    built-in name, a local path, an s3:// prefix, an unpinned hub id) as (`model`, None)."""
    name, at, revision = model.rpartition("@")
    if at and HUB_ID.fullmatch(name) and REVISION.fullmatch(revision) and not Path(model).exists():
        return name, revision
    return model, None


def model_revision(model: str) -> str | None:
    """The revisions a model name pins (a cascade: its stages', joined by `+`); None if it pins none."""
    revisions = [split_revision(part)[1] for part in model.split(CASCADE_SEPARATOR)]
    return None if not any(revisions) else CASCADE_SEPARATOR.join(r or "" for r in revisions)
