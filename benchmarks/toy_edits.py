"""Mini-TEdBench on the toy model: does an edit change what the text asks, and keep everything else?

    python benchmarks/toy_edits.py --preset fast                      # 50 cases, default η grid
    python benchmarks/toy_edits.py --preset community --set finetune_lr=1e-4 --cases 20 --workers 2

Each case is a textured input scene (seeded: random shape, colour, background, position, size) and a
target text that changes its colour, shape, background, or two of them. For every η of the grid the
oracle scores the output:
  success     the oracle reads every attribute the target text names;
  preserved   the shape's centre moved ≤ 3 px (of 32), its size changed ≤ 15 %, and the attributes the
              text did not change are unchanged;
  both        success and preserved.
Writes <out>/<name>.json (config, seconds per edit, per-η rates, raw per-case results) and
<out>/<name>.png (rates against η, like the paper's Fig. 9), and a contact sheet of the first cases.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_ETAS = (0.0, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
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
    size_change = abs(m.size - scene["size"]) / scene["size"]
    kept = all(getattr(m, a) == scene[a] for a in ("color", "shape", "background") if a not in case["changed"])
    success = m.attributes() == wanted
    preserved = bool(kept and shift <= MAX_SHIFT_PX and size_change <= MAX_SIZE_CHANGE)
    return {"measured": m.attributes(), "shift_px": round(shift, 3), "size_change": round(size_change, 4),
            "success": success, "preserved": preserved, "both": success and preserved}


_editor = None


def _init_worker(model: str, threads: int) -> None:
    import torch

    from imagic import Editor, load_pipeline

    global _editor
    if threads:
        torch.set_num_threads(threads)
    _editor = Editor(load_pipeline(model))


def run_case(args: tuple[dict, dict, list[float], list[int], str | None]) -> dict:
    from imagic import EditConfig
    from imagic.toy import Scene, render

    case, config_data, etas, seeds, sheet_dir = args
    config = EditConfig(**config_data)
    image = render(Scene(**case["scene"]), np.random.default_rng(case["texture_seed"]))
    started = time.perf_counter()
    result = _editor.edit(image, case["target_text"], config, etas, seeds)
    seconds = time.perf_counter() - started
    if sheet_dir:
        from imagic.sheet import contact_sheet

        contact_sheet(result.input_image, result.images, title=f"{case['source_text']} -> {case['target_text']}") \
            .save(Path(sheet_dir) / f"{case['id']}.png")
    per_image = [{"eta": eta, "seed": seed, **score(case, img)} for (eta, seed), img in sorted(result.images.items())]
    return {**case, "seconds": seconds, "stage_seconds": result.seconds, "results": per_image}


def summarise(rows: list[dict], etas: list[float]) -> dict:
    by_eta = {}
    for eta in etas:
        outcomes = [r for row in rows for r in row["results"] if r["eta"] == eta]
        by_eta[eta] = {k: float(np.mean([o[k] for o in outcomes])) for k in ("success", "preserved", "both")}
    # Best single η: highest success among those that keep preservation ≥ 0.9 (else highest "both").
    eligible = [e for e in etas if by_eta[e]["preserved"] >= 0.9] or etas
    best = max(eligible, key=lambda e: (by_eta[e]["success"], by_eta[e]["both"]))
    kinds = {}
    for kind in KINDS:
        outcomes = [r for row in rows if row["kind"] == kind for r in row["results"] if r["eta"] == best]
        if outcomes:
            kinds[kind] = float(np.mean([o["both"] for o in outcomes]))
    return {"by_eta": by_eta, "best_eta": best, "best": by_eta[best], "both_by_kind_at_best_eta": kinds,
            "seconds_per_edit": float(np.mean([row["seconds"] for row in rows]))}


def plot(summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    etas = sorted(summary["by_eta"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("success", "edit success (oracle)"), ("preserved", "preservation"), ("both", "both")):
        ax.plot(etas, [summary["by_eta"][e][key] for e in etas], marker="o", label=label)
    ax.axhline(0.9, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("η"), ax.set_ylabel("fraction of cases"), ax.set_ylim(-0.02, 1.02), ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=JSON (repeatable)")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--etas", default=",".join(map(str, DEFAULT_ETAS)))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=1, help="processes (each with --threads torch threads)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--sheets", type=int, default=6, help="contact sheets for the first N cases")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", help="output file stem [default: toy_edits_<preset>]")
    args = parser.parse_args()

    from imagic import make_config

    overrides = {k: json.loads(v) for k, v in (pair.split("=", 1) for pair in args.set)}
    config = make_config(args.preset, **overrides)
    etas = [float(e) for e in args.etas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    name = args.name or f"toy_edits_{args.preset}"
    sheet_dir = args.out / f"{name}_sheets"
    sheet_dir.mkdir(parents=True, exist_ok=True)
    cases = make_cases(args.cases)
    jobs = [(case, config.model_dump(mode="json"), etas, seeds, str(sheet_dir) if i < args.sheets else None)
            for i, case in enumerate(cases)]

    started = time.perf_counter()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers, _init_worker, (args.model, args.threads or 1)) as pool:
            rows = pool.map(run_case, jobs, chunksize=1)
    else:
        _init_worker(args.model, args.threads)
        rows = [run_case(job) for job in jobs]
    wall = time.perf_counter() - started

    summary = summarise(rows, etas)
    report = {"preset": args.preset, "config": config.model_dump(mode="json"), "model": args.model,
              "cases": len(cases), "etas": etas, "seeds": seeds, "workers": args.workers,
              "threads_per_worker": args.threads or (1 if args.workers > 1 else os.cpu_count()),
              "wall_seconds": wall, **summary, "rows": rows}
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(summary, f"toy edits, preset {args.preset} ({len(cases)} cases)", args.out / f"{name}.png")
    print(f"{name}: {len(cases)} cases, {summary['seconds_per_edit']:.1f} s/edit, wall {wall:.0f}s")
    print("  η     success  preserved  both")
    for eta in etas:
        r = summary["by_eta"][eta]
        print(f"  {eta:<5} {r['success']:.2f}     {r['preserved']:.2f}       {r['both']:.2f}")
    print(f"  best η {summary['best_eta']}: {summary['best']}; by kind: {summary['both_by_kind_at_best_eta']}")


if __name__ == "__main__":
    main()
