"""Mini-TEdBench on the toy model: does an edit change what the text asks, keep everything else, and does
the automatic choice pick an output that does both?

    python benchmarks/toy_edits.py --preset anchored --split tuning --workers 2
    python benchmarks/toy_edits.py --preset anchored --preset fast --split heldout --workers 2   # side by side

Each case is a textured input scene (seeded: random shape, colour, background, position, size) and a
target text that changes its colour, shape, background, or two of them. Two splits are drawn with
different generator seeds: `tuning` (the selection rule's thresholds are chosen on it, `--tune`) and
`heldout` (never used for any choice). For every output the oracle measures:
  success     the oracle reads every attribute the target text names;
  preserved   the shape's centre moved ≤ 3 px (of 32), its size changed ≤ 15 %, and the attributes the
              text did not change are unchanged;
  both        success and preserved;
next to the engine's own scores (edit, fidelity) and, per case, the engine's selected output or verdict.
Writes <out>/<name>.json (config, seconds, per-η rates with 95 % bootstrap intervals, score AUCs,
selection precision and coverage, raw per-output results) and <out>/<name>.png (success against
preservation per η like the paper's Fig. 9, the selected outputs marked), and contact sheets.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_ETAS = (0.0, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
SPLITS = {"tuning": 2023, "heldout": 7919}  # generator seeds of the two case sets
KINDS = ("color", "shape", "background", "color+shape", "color+background", "shape+background")
MAX_SHIFT_PX, MAX_SIZE_CHANGE = 3.0, 0.15


def make_cases(n: int, seed: int = 2023) -> list[dict]:
    """`n` fixed cases, kinds in rotation; the new value of each changed attribute differs from the old."""
    from imagic.toy import BACKGROUNDS, COLORS, SHAPES, caption, random_scene

    choices = {"color": list(COLORS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        scene = random_scene(rng)
        changes = {}
        for attribute in kind.split("+"):
            options = [v for v in choices[attribute] if v != getattr(scene, attribute)]
            changes[attribute] = str(rng.choice(options))
        target = scene.with_(**changes)
        cases.append({"id": f"case-{i:03d}", "kind": kind, "scene": scene.__dict__, "texture_seed": 1000 + i,
                      "source_text": caption(scene), "target_text": caption(target), "changed": sorted(changes)})
    return cases


def score(case: dict, image) -> dict:
    from imagic.toy import measure, parse_caption

    m = measure(image)
    wanted = parse_caption(case["target_text"])
    scene = case["scene"]
    shift = float(np.hypot(m.cx - scene["cx"], m.cy - scene["cy"]))
    signed_size_change = (m.size - scene["size"]) / scene["size"]
    size_change = abs(signed_size_change)
    kept = all(getattr(m, a) == scene[a] for a in ("color", "shape", "background") if a not in case["changed"])
    success = m.attributes() == wanted
    preserved = bool(kept and shift <= MAX_SHIFT_PX and size_change <= MAX_SIZE_CHANGE)
    return {"measured": m.attributes(), "centre": [round(m.cx, 3), round(m.cy, 3)], "shift_px": round(shift, 3),
            "size_change": round(signed_size_change, 4),
            "success": success, "preserved": preserved, "both": success and preserved}


_editor = None


def _init_worker(model: str, threads: int) -> None:
    import torch

    from imagic import Editor

    global _editor
    if threads:
        torch.set_num_threads(threads)
    _editor = Editor.from_pretrained(model)


def run_case(args: tuple[str, dict, dict, list[float], list[int], str | None, str | None]) -> dict:
    from imagic import EditConfig
    from imagic.toy import Scene, render

    preset, case, config_data, etas, seeds, sheet_dir, image_dir = args
    config = EditConfig(**config_data)
    image = render(Scene(**case["scene"]), np.random.default_rng(case["texture_seed"]))
    started = time.perf_counter()
    result = _editor.edit(image, case["target_text"], config, etas, seeds)
    seconds = time.perf_counter() - started
    if sheet_dir:
        from imagic.batch.sheet import contact_sheet

        contact_sheet(result.input_image, result.images, title=f"{case['source_text']} -> {case['target_text']}",
                      selection=result.selection).save(Path(sheet_dir) / f"{case['id']}.png")
    if image_dir:  # every output, to score again offline (benchmarks/rescore.py)
        folder = Path(image_dir) / case["id"]
        folder.mkdir(parents=True, exist_ok=True)
        result.input_image.save(folder / "input.png")
        for (eta, seed), img in result.images.items():
            img.save(folder / f"{eta}_{seed}.png")
    per_image = [{"eta": eta, "seed": seed, **score(case, img), **result.scores.get((eta, seed), {})}
                 for (eta, seed), img in sorted(result.images.items())]
    selection = result.selection.to_json() if result.selection else None
    return {**case, "preset": preset, "seconds": seconds, "stage_seconds": result.seconds,
            "reconstruction_fidelity": result.reconstruction_fidelity, "selection": selection, "results": per_image}


def bootstrap(values: list[float], draws: int = 2000, seed: int = 0) -> list[float]:
    """Mean and 95 % percentile-bootstrap interval, resampling cases."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return [float("nan")] * 3
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
    return [round(float(values.mean()), 4), round(float(np.percentile(means, 2.5)), 4),
            round(float(np.percentile(means, 97.5)), 4)]


def auc(labels: list[bool], scores: list[float]) -> float:
    """ROC AUC (Mann–Whitney): the chance a random positive scores above a random negative."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    positive, negative = scores[labels], scores[~labels]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return round(float(greater / (len(positive) * len(negative))), 4)


def summarise(rows: list[dict], etas: list[float]) -> dict:
    """Per-η rates (case means over seeds, bootstrapped over cases), score AUCs, and the selection."""
    by_eta = {}
    for eta in etas:
        by_eta[eta] = {k: bootstrap([np.mean([o[k] for o in row["results"] if o["eta"] == eta]) for row in rows])
                       for k in ("success", "preserved", "both")}
    outputs = [o for row in rows for o in row["results"] if o["eta"] > 0 and "edit" in o]
    aucs = {"edit_vs_success": auc([o["success"] for o in outputs], [o["edit"] for o in outputs]),
            "fidelity_vs_preserved": auc([o["preserved"] for o in outputs], [o["fidelity"] for o in outputs])}
    picked = {row["id"]: _selected_output(row) for row in rows}  # None where the case needs review
    chosen = [o for o in picked.values() if o is not None]
    selection = {"coverage": bootstrap([o is not None for o in picked.values()]),
                 "precision_both": bootstrap([o["both"] for o in chosen]),
                 "success": bootstrap([o["success"] for o in chosen]),
                 "preserved": bootstrap([o["preserved"] for o in chosen]),
                 "both_of_all_cases": bootstrap([o["both"] for o in chosen] + [0.0] * (len(rows) - len(chosen))),
                 "selected_etas": [o["eta"] for o in chosen]}
    oracle_best = bootstrap([max(o["both"] for o in row["results"] if o["eta"] > 0) for row in rows])
    kinds = {kind: round(float(np.mean([bool(picked[r["id"]] and picked[r["id"]]["both"])
                                        for r in rows if r["kind"] == kind])), 3)
             for kind in KINDS if any(r["kind"] == kind for r in rows)}
    return {"by_eta": by_eta, "eta0_preserved": by_eta[0.0]["preserved"] if 0.0 in by_eta else None,
            "score_auc": aucs, "selection": selection, "any_output_both": oracle_best,
            "selected_both_by_kind": kinds, "seconds_per_edit": bootstrap([row["seconds"] for row in rows])}


def _selected_output(row: dict) -> dict | None:
    """The per-output result the engine selected for this case, or None (needs review)."""
    selection = row["selection"]
    if not selection or selection["verdict"] != "selected":
        return None
    return next(o for o in row["results"] if (o["eta"], o["seed"]) == (selection["eta"], selection["seed"]))


def tune_selection(rows: list[dict], min_precision: float = 0.9) -> dict:
    """Thresholds of the selection rule, absolute or relative to the η=0 render's fidelity, that cover the most
    cases at ≥ `min_precision` "both" (or, if none reaches it, the highest precision), replaying the engine's
    own `select` on the stored scores."""
    from imagic import make_config
    from imagic.engine.selection import select

    best = None
    for mode in ("absolute", "relative"):
        for min_edit in np.round(np.arange(0.0, 0.61, 0.05), 3):
            for min_fidelity in np.round(np.arange(0.3, 0.96, 0.05), 3):
                thresholds = {"select_fidelity": mode, "select_min_edit": float(min_edit),
                              "select_min_fidelity": float(min_fidelity)}
                config = make_config(**thresholds)
                hits = []
                for row in rows:
                    scores = {(o["eta"], o["seed"]): o for o in row["results"] if o["eta"] > 0}
                    chosen = select(scores, row["reconstruction_fidelity"], config)
                    if chosen.verdict == "selected":
                        hits.append(scores[(chosen.eta, chosen.seed)]["both"])
                precision = float(np.mean(hits)) if hits else 0.0
                coverage = len(hits) / len(rows)
                key = (precision >= min_precision, coverage if precision >= min_precision else precision, precision)
                if best is None or key > best[0]:
                    best = (key, {**thresholds, "precision_both": round(precision, 4), "coverage": round(coverage, 4)})
    return best[1]


def plot(summaries: dict[str, dict], title: str, path: Path) -> None:
    """Like the paper's Fig. 9: per η, edit success (y) against preservation (x); the selected outputs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (preset, summary), colour in zip(summaries.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        etas = sorted(summary["by_eta"])
        xs = [summary["by_eta"][e]["preserved"][0] for e in etas]
        ys = [summary["by_eta"][e]["success"][0] for e in etas]
        ax.plot(xs, ys, marker="o", color=colour, label=f"{preset}: η = {etas[0]:g} … {etas[-1]:g}")
        for x, y, eta in zip(xs, ys, etas):
            ax.annotate(f"{eta:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=colour)
        sel = summary["selection"]
        ax.scatter([sel["preserved"][0]], [sel["success"][0]], marker="*", s=220, color=colour, edgecolor="black",
                   zorder=5, label=f"{preset}: selected (coverage {sel['coverage'][0]:.2f})")
    ax.set_xlabel("preservation (oracle)"), ax.set_ylabel("edit success (oracle)")
    ax.set_xlim(-0.02, 1.02), ax.set_ylim(-0.02, 1.02), ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def variant_config(spec: str, family: str, overrides: dict):
    """`anchored` or `anchored,finetune_steps=100,inversion_strength=0.8`: a preset with its own overrides on
    top of the run's `--set` ones."""
    from imagic import make_config

    preset, *pairs = spec.split(",")
    own = {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in pairs)}
    return make_config(preset, family, **{**overrides, **own})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="PRESET or PRESET,KEY=JSON,... (a variant, labelled as "
                        "written); repeat to run side by side [default: anchored]")
    parser.add_argument("--split", choices=list(SPLITS), default="tuning")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=JSON (repeatable)")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--etas", default=",".join(map(str, DEFAULT_ETAS)))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=1, help="processes (each with --threads torch threads)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--sheets", type=int, default=6, help="contact sheets for the first N cases")
    parser.add_argument("--images", action="store_true", help="save every output under <out>/<name>_<preset>_images")
    parser.add_argument("--tune", action="store_true", help="also search the selection thresholds (tuning split)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", help="output file stem [default: toy_edits_<split>]")
    args = parser.parse_args()

    from imagic.engine.builtins import model_family

    presets = args.preset or ["anchored"]
    overrides = {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.set)}
    configs = {p: variant_config(p, model_family(args.model), overrides) for p in presets}
    etas = [float(e) for e in args.etas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    name = args.name or f"toy_edits_{args.split}"
    cases = make_cases(args.cases, seed=SPLITS[args.split])
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, case in enumerate(cases):  # presets interleaved: they share the machine's load alike
        for preset, config in configs.items():
            stem = args.out / f"{name}_{preset.replace(',', '_').replace('=', '')}"
            sheet_dir = Path(f"{stem}_sheets")
            if i < args.sheets:
                sheet_dir.mkdir(parents=True, exist_ok=True)
            jobs.append((preset, case, config.model_dump(mode="json"), etas, seeds,
                         str(sheet_dir) if i < args.sheets else None, f"{stem}_images" if args.images else None))

    started = time.perf_counter()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers, _init_worker, (args.model, args.threads or 1)) as pool:
            rows = pool.map(run_case, jobs, chunksize=1)
    else:
        _init_worker(args.model, args.threads)
        rows = [run_case(job) for job in jobs]
    wall = time.perf_counter() - started

    summaries = {p: summarise([r for r in rows if r["preset"] == p], etas) for p in presets}
    report = {"split": args.split, "split_seed": SPLITS[args.split], "model": args.model, "cases": len(cases),
              "etas": etas, "seeds": seeds, "workers": args.workers,
              "threads_per_worker": args.threads or (1 if args.workers > 1 else os.cpu_count()), "wall_seconds": wall,
              "presets": {p: {"config": configs[p].model_dump(mode="json"), **summaries[p]} for p in presets}}
    if args.tune:
        report["tuned_selection"] = {p: tune_selection([r for r in rows if r["preset"] == p]) for p in presets}
    report["rows"] = rows
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(summaries, f"toy edits, {args.split} split ({len(cases)} cases × {len(seeds)} seeds)", args.out / f"{name}.png")
    print(f"{name}: {len(cases)} cases, wall {wall:.0f}s")
    for preset, summary in summaries.items():
        print(f"[{preset}] s/edit {summary['seconds_per_edit']}; score AUC {summary['score_auc']}")
        print("  η     success  preserved  both")
        for eta in etas:
            r = summary["by_eta"][eta]
            print(f"  {eta:<5} {r['success'][0]:.2f}     {r['preserved'][0]:.2f}       {r['both'][0]:.2f}")
        sel = summary["selection"]
        print(f"  selected: both among accepted {sel['precision_both']}, coverage {sel['coverage']}, "
              f"any output both {summary['any_output_both']}")
        if args.tune:
            print(f"  tuned selection: {report['tuned_selection'][preset]}")


if __name__ == "__main__":
    main()
