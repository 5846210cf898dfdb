"""Score a finished toy-edits run again from its saved outputs (`toy_edits.py --images`): each fidelity measure's
ROC AUC against the oracle's "preserved", and the selection replayed with the engine's own rule — tuned on a
tuning-split run, then applied unchanged to a held-out one.

    python benchmarks/rescore.py benchmarks/results/toy_edits_tuning16.json                   # AUCs, tuned rule
    python benchmarks/rescore.py HELDOUT.json --tuned-on TUNING.json --fidelity edges_coarse  # held out

No model is loaded: fidelity needs the input and the output only, and the edit scores are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from toy_edits import auc, summarise, tune_selection  # noqa: E402

from imagic.engine.scores import FIDELITY_MEASURES  # noqa: E402


def images_folder(run: Path, preset: str) -> Path:
    return run.with_name(f"{run.stem}_{preset.replace(',', '_').replace('=', '')}_images")


def rescore(rows: list[dict], folder: Path, measure: str) -> list[dict]:
    """The rows with every output's fidelity (and the η=0 reconstruction's) by `measure`."""
    similarity = FIDELITY_MEASURES[measure]
    scored = []
    for row in rows:
        case = folder / row["id"]
        source = Image.open(case / "input.png").convert("RGB")
        results = [{**o, "fidelity": round(similarity(source, Image.open(case / f"{o['eta']}_{o['seed']}.png")), 5)}
                   for o in row["results"]]
        zero = [o["fidelity"] for o in results if o["eta"] == 0.0]
        scored.append({**row, "results": results, "reconstruction_fidelity": zero[0] if zero else None})
    return scored


def replay(rows: list[dict], thresholds: dict) -> list[dict]:
    """The rows with the engine's selection recomputed under `thresholds`."""
    from imagic import make_config
    from imagic.engine.selection import select

    config = make_config(**{k: v for k, v in thresholds.items() if k.startswith("select_")})
    out = []
    for row in rows:
        scores = {(o["eta"], o["seed"]): o for o in row["results"] if o["eta"] > 0}
        out.append({**row, "selection": select(scores, row["reconstruction_fidelity"], config).to_json()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--preset", help="the run's preset label [default: its first]")
    parser.add_argument("--fidelity", action="append", help=f"one of {', '.join(FIDELITY_MEASURES)} [default: all]")
    parser.add_argument("--tuned-on", type=Path, help="a tuning-split run: thresholds tuned there, applied here")
    parser.add_argument("--json", type=Path, help="write the summaries here")
    args = parser.parse_args()

    report = json.loads(args.run.read_text())
    preset = args.preset or next(iter(report["presets"]))
    rows = [r for r in report["rows"] if r["preset"] == preset]
    tuning = json.loads(args.tuned_on.read_text()) if args.tuned_on else None
    out = {}
    for measure in args.fidelity or list(FIDELITY_MEASURES):
        scored = rescore(rows, images_folder(args.run, preset), measure)
        outputs = [o for r in scored for o in r["results"] if o["eta"] > 0]
        fidelity_auc = auc([o["preserved"] for o in outputs], [o["fidelity"] for o in outputs])
        if tuning:
            tuning_rows = [r for r in tuning["rows"] if r["preset"] == preset]
            thresholds = tune_selection(rescore(tuning_rows, images_folder(args.tuned_on, preset), measure))
        else:
            thresholds = tune_selection(scored)
        summary = summarise(replay(scored, thresholds), report["etas"])
        sel = summary["selection"]
        print(f"[{measure}] fidelity AUC {fidelity_auc}; thresholds {thresholds}")
        print(f"  coverage {sel['coverage']} at precision {sel['precision_both']}; "
              f"by kind {summary['selected_both_by_kind']}")
        out[measure] = {"fidelity_auc": fidelity_auc, "thresholds": thresholds, "selection": sel,
                        "selected_both_by_kind": summary["selected_both_by_kind"]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
