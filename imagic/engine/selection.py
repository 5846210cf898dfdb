"""One output per edit, chosen from its scores — or an honest `needs_review` with the reason.

The rule (its thresholds live in `EditConfig`; a built-in model's are chosen on the toy benchmark's tuning
split and stored with it, imagic/engine/builtins.py):
1. the η = 0 render must give the input back (fidelity ≥ `select_min_reconstruction`), otherwise no
   output can be trusted to keep the input;
2. candidates are the outputs with edit ≥ `select_min_edit` and fidelity ≥ `select_min_fidelity` (with
   `select_fidelity="relative"`, fidelity divided by the η = 0 render's: for models with no tuned thresholds);
3. of those, the one with the highest edit + fidelity; ties go to the smaller η, then the smaller seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from imagic.engine.config import EditConfig


@dataclass(frozen=True)
class Selection:
    verdict: str  # "selected" | "needs_review"
    eta: float | None = None
    seed: int | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def select(scores: dict[tuple[float, int], dict], reconstruction_fidelity: float | None,
           config: EditConfig) -> Selection:
    """Apply the rule above to `scores` ({(η, seed): {"edit", "fidelity"}})."""
    if not scores:
        return Selection("needs_review", reason="the outputs were not scored")
    if reconstruction_fidelity is not None and reconstruction_fidelity < config.select_min_reconstruction:
        return Selection("needs_review", reason=(
            f"η=0 does not reproduce the input (fidelity {reconstruction_fidelity:.3f} < "
            f"{config.select_min_reconstruction}): the fine-tune did not learn this image"))
    edits = {k: s for k, s in scores.items() if s["edit"] >= config.select_min_edit}
    if not edits:
        best = max(s["edit"] for s in scores.values())
        return Selection("needs_review", reason=(
            f"no output edits enough (best edit score {best:.3f} < {config.select_min_edit})"))
    relative = config.select_fidelity == "relative" and (reconstruction_fidelity or 0.0) > 0
    reference = reconstruction_fidelity if relative else 1.0
    kept = {k: s for k, s in edits.items() if s["fidelity"] / reference >= config.select_min_fidelity}
    if not kept:
        best = max(s["fidelity"] for s in edits.values()) / reference
        measure = "fidelity among edits, relative to η=0's," if relative else "fidelity among edits"
        return Selection("needs_review", reason=(
            f"no output edits enough without losing the input (best {measure} {best:.3f} < "
            f"{config.select_min_fidelity})"))
    (eta, seed), _ = min(kept.items(), key=lambda kv: (-(kv[1]["edit"] + kv[1]["fidelity"]), kv[0][0], kv[0][1]))
    return Selection("selected", eta=eta, seed=seed)
