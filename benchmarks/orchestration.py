"""Orchestration overhead per entry, local vs deployment mode, on the toy model; parent memory for planning.

    python benchmarks/orchestration.py                  # 8 entries, chunks of 2, both modes, then planning
    python benchmarks/orchestration.py --entries 16 --json benchmarks/results/orchestration.json

overhead per entry = (wall time of `imagic run` − Σ engine seconds in the entries' records) / entries.
Both modes run in the same invocation, one after the other, on the same inputs: compare them, not the
absolute numbers (shared, noisy machines). Deployment mode runs against a local `prefect server` with a
`process` work pool and one worker (limit 1: one "GPU"), which is already up, as a cluster would be.
Planning: the real `bulk_edit` flow over a 1,000-entry manifest whose entries are all finished, in a
fresh process; peak RSS of that process minus its RSS after imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster import LocalCluster, stop

STEPS = {"embedding_steps": 20, "finetune_steps": 20, "num_inference_steps": 10}
PLANNING = """
import json, resource, sys, time
from flows.bulk_edit import bulk_edit
from prefect.testing.utilities import prefect_test_harness
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with prefect_test_harness(server_startup_timeout=120):
    base = rss(); started = time.perf_counter()
    state = bulk_edit(sys.argv[1], sys.argv[2], return_state=True)
    print(json.dumps({"message": state.message, "seconds": time.perf_counter() - started,
                      "rss_after_imports_mb": base, "peak_rss_mb": rss()}))
"""


def write_inputs(folder: Path, count: int) -> Path:
    import numpy as np

    from imagic.toy.scenes import random_scene, render

    rng = np.random.default_rng(0)
    lines = [json.dumps({"defaults": {"etas": [0.8, 1.0], "preset": "fast", "overrides": STEPS}})]
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    for i in range(count):
        scene = random_scene(rng, shape=shapes[i % 3], color=colours[i % 4], background="white")
        render(scene, rng).save(folder / f"in-{i}.png")
        lines.append(json.dumps({"id": f"e{i}", "image": str(folder / f"in-{i}.png"),
                                 "target_text": f"a {colours[(i + 1) % 4]} {shapes[i % 3]} on white background"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run_batch(manifest: Path, output: Path, mode: str, chunk_size: int, env: dict | None = None) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imagic", "run", str(manifest), "--output", str(output), "--mode", mode,
                    "--chunk-size", str(chunk_size), "--max-in-flight", "1"], env=env, check=True,
                   capture_output=True)
    wall = time.perf_counter() - started
    records = [json.loads(p.read_text()) for p in output.glob("*/record.json")]
    engine = sum(r["seconds"]["total"] for r in records)
    report = json.loads(next(output.glob("_batches/*/report.json")).read_text())
    return {"mode": mode, "entries": len(records), "chunk_size": chunk_size, "wall_s": wall,
            "flow_wall_s": report["wall_seconds"], "engine_s": engine,
            "overhead_per_entry_s": (wall - engine) / len(records),
            "flow_overhead_per_entry_s": (report["wall_seconds"] - engine) / len(records)}


def planning(folder: Path, count: int) -> dict:
    import numpy as np

    from imagic.toy.scenes import random_scene, render

    rng = np.random.default_rng(1)
    render(random_scene(rng, shape="circle", color="red", background="white"), rng).save(folder / "p.png")
    output = folder / "planned"
    lines = []
    for i in range(count):
        lines.append(json.dumps({"id": f"p{i:04d}", "image": str(folder / "p.png"), "target_text": "a blue circle"}))
        (output / f"p{i:04d}").mkdir(parents=True)
        (output / f"p{i:04d}" / "record.json").write_text("{}")
    manifest = folder / "planned.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-c", PLANNING, str(manifest), str(output)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"entries": count, **result, "planning_rss_mb": result["peak_rss_mb"] - result["rss_after_imports_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--planning-entries", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_inputs(tmp, args.entries)
        rows = [run_batch(manifest, tmp / "local", "local", args.chunk_size)]
        (tmp / "home").mkdir()
        # The toy inputs are local files: allowed here (deployment mode reads only s3:// by default).
        with LocalCluster(tmp / "home", {"OMP_NUM_THREADS": "2", "IMAGIC_ALLOWED_INPUTS": "file:"}) as cluster:
            worker = cluster.start_worker("worker", limit=1)
            try:
                rows.append(run_batch(manifest, tmp / "deployment", "deployment", args.chunk_size, cluster.env))
            finally:
                stop(worker)
        plan = planning(tmp, args.planning_entries)

    print("| mode | entries | chunk | wall s | engine s | overhead s/entry (CLI wall) | overhead s/entry (flow) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['entries']} | {r['chunk_size']} | {r['wall_s']:.1f} | {r['engine_s']:.1f} | "
              f"{r['overhead_per_entry_s']:.2f} | {r['flow_overhead_per_entry_s']:.2f} |")
    print(f"\nplanning {plan['entries']} finished entries: {plan['seconds']:.1f} s, '{plan['message']}', "
          f"parent RSS +{plan['planning_rss_mb']:.0f} MB (peak {plan['peak_rss_mb']:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "planning": plan, "steps": STEPS}, indent=1) + "\n")


if __name__ == "__main__":
    main()
