"""The η and seed rules, once: the manifest, the config checks, the CLI, the JSON Schema and the render
all use these.

η interpolates the two embeddings, ē = η·e_tgt + (1−η)·e_opt: η = 0 is e_opt (it reconstructs the input),
η = 1 the target text's own embedding; peers extrapolate a little past 1 (~1.2).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError

ETA_MIN, ETA_MAX = 0.0, 2.0
DEFAULT_ETAS = (0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)  # wide: the selection picks (README, toy benchmark)
DEFAULT_SEEDS = (0,)


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError("must not repeat")
    return values


Etas = Annotated[list[Annotated[float, Field(ge=ETA_MIN, le=ETA_MAX)]],
                 Field(min_length=1, json_schema_extra={"uniqueItems": True}), AfterValidator(_distinct)]
SEED_MAX = 2**63 - 1  # a seed is an int64 everywhere it is stored (Parquet, torch's generator takes < 2⁶⁴)
Seeds = Annotated[list[Annotated[int, Field(ge=0, le=SEED_MAX)]],
                  Field(min_length=1, json_schema_extra={"uniqueItems": True}), AfterValidator(_distinct)]
GRID_MESSAGES = {"etas": f"must be a non-empty list of distinct numbers in [{ETA_MIN:g}, {ETA_MAX:g}]",
                 "seeds": f"must be a non-empty list of distinct integers in [0, {SEED_MAX}]"}
_GRID = {"etas": TypeAdapter(Etas), "seeds": TypeAdapter(Seeds)}


def check_grid(etas, seeds) -> None:
    """Raise ValueError (`etas: must be …`) when the η grid or the seeds break the rules above."""
    for name, values in (("etas", etas), ("seeds", seeds)):
        try:
            _GRID[name].validate_python(list(values), strict=False)
        except ValidationError:
            raise ValueError(f"{name}: {GRID_MESSAGES[name]}, got {list(values)}") from None


def check_image_etas(etas, scored: bool) -> list[float]:
    """The η rendered beside the outputs and dropped after scoring: η = 0, to ask whether the edit still
    holds the input (none when the outputs are not scored, or when η = 0 is an output already)."""
    return [] if not scored or 0.0 in etas else [0.0]


def interpolate(e_tgt, e_opt, eta: float):
    """ē = η·e_tgt + (1−η)·e_opt: η=0 is exactly e_opt (the input image), η=1 exactly e_tgt."""
    return eta * e_tgt + (1.0 - eta) * e_opt


def render_chunks(etas, seeds, config) -> list[list[tuple[float, int]]]:
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
