"""The parent's work as a batch grows: a re-run over N finished entries (real-shaped records, cloned from a
real edit of the toy model), in a local store. Each phase runs in a fresh process, so its seconds and peak
RSS are its own:

    validate   read and validate the manifest (N entries)
    plan       validate + plan: one listing, every record read and compared, every input re-hashed
    report     validate + plan + the batch's report, index, Parquet and metadata.jsonl

    python benchmarks/scale.py --sizes 1000,10000            # writes benchmarks/results/scale.json
    python benchmarks/scale.py --sizes 100000 --keep /data/scale   # 100k: 1.6 GB of records, 1.4 M files

The parent's memory per finished entry is (RSS holding the plan − RSS holding the validated entries) / N:
what the plan costs beyond the manifest's own entries (those cost `entries_bytes_per_entry`). Every phase
imports torch and diffusers first, as the parent flow does (its chunk flow's editor): that is most of the
peak at small N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TARGET = "a blue circle on black background"


def real_record(work: Path) -> tuple[dict, list[str], Path]:
    """One edit of the toy model at the default preset (≈ 1 min on 2 cores): its record, file names, input."""
    from imagic import Editor
    from imagic.batch.manifest import single_entry
    from imagic.batch.run import run_entry
    from imagic.batch.settings import Settings
    from imagic.io.storage import LocalStorage

    image = work / "input.png"
    shutil.copy(REPO / "examples" / "toy" / "red-circle-on-black.png", image)
    entry = single_entry(str(image), TARGET, entry_id="real", model="toy")
    store = LocalStorage(work / "real")
    record = run_entry(Editor.from_pretrained("toy"), entry, store, model="toy", settings=Settings.defaults())
    assert record["status"] in ("succeeded", "already_done"), record  # already_done: a kept folder
    return record, [key.removeprefix("real/") for key in store.list("real/")], image


def build(root: Path, n: int, record: dict, names: list[str], image: Path) -> Path:
    """N finished entries `e000000/…` (the record cloned, every output file present and empty), and a manifest
    asking for exactly what they answer."""
    store = root / "store"
    text = json.dumps(record)
    for i in range(n):
        entry_id = f"e{i:06d}"
        folder = store / entry_id
        (folder / "artifacts").mkdir(parents=True, exist_ok=True)
        for name in names:
            if name != "record.json":
                (folder / name).touch()
        (folder / "record.json").write_text(text.replace('"real"', f'"{entry_id}"').replace("/real/", f"/{entry_id}/"))
    lines = [json.dumps({"id": f"e{i:06d}", "image": str(image), "target_text": TARGET}) for i in range(n)]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return store


def phase(name: str, store: Path, manifest: Path) -> dict:
    """One phase in this process (run by `--phase`): seconds of the phase, and the process's peak RSS."""
    from imagic.batch.manifest import read_manifest_text, runnable, validate_manifest
    from imagic.batch.plan import plan
    from imagic.batch.report import batch_report, run_info, run_records, write_report
    from imagic.batch.run import read_records
    from imagic.engine.identity import known_model_sha256
    from imagic.io.storage import LocalStorage

    imported = psutil.Process().memory_info().rss  # torch and diffusers are in every parent (the chunk flow's)
    started = time.perf_counter()
    entries = runnable(*validate_manifest(read_manifest_text(str(manifest)), "jsonl"))
    seconds = {"validate": time.perf_counter() - started}
    if name in ("plan", "report"):
        started = time.perf_counter()
        planned = plan(entries, LocalStorage(store), model="toy", model_hash=known_model_sha256("toy"))
        seconds["plan"] = time.perf_counter() - started
        assert len(planned.done) == len(entries), (len(planned.done), len(planned.changed), len(planned.todo))
    if name == "report":
        started = time.perf_counter()
        out = LocalStorage(store)
        records = run_records(planned, rejected=[], edited=read_records(planned.todo, out),
                              failed_before=read_records(planned.failed, out))
        report = batch_report("scale", records, seconds=0.0, run=run_info("run-1", str(manifest), str(store), "toy", "failed"))
        write_report(out, report, {r["entry_id"]: r for r in records})
        seconds["report"] = time.perf_counter() - started
    held = psutil.Process().memory_info().rss  # with the phase's results still alive
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_imports_bytes": imported, "rss_held_bytes": held}


def measure(n: int, store: Path, manifest: Path) -> dict:
    row = {"entries": n}
    for name in ("validate", "plan", "report"):
        out = subprocess.run([sys.executable, __file__, "--phase", name, "--store", str(store), "--manifest",
                              str(manifest)], check=True, capture_output=True, text=True, cwd=REPO)
        row[name] = json.loads(out.stdout.strip().splitlines()[-1])
    row["plan_bytes_per_entry"] = (row["plan"]["rss_held_bytes"] - row["validate"]["rss_held_bytes"]) / n
    row["entries_bytes_per_entry"] = (row["validate"]["rss_held_bytes"] - row["validate"]["rss_after_imports_bytes"]) / n
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--keep", type=Path, help="build the stores here and keep them (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: measure the stores built there before")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--phase", choices=["validate", "plan", "report"], help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.store, args.manifest)))
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="imagic-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    record, names, image = real_record(work)
    rows = []
    for n in (int(size) for size in args.sizes.split(",")):
        started = time.perf_counter()
        reuse = args.reuse and (work / f"n{n}" / "manifest.jsonl").is_file()
        store = work / f"n{n}" / "store" if reuse else build(work / f"n{n}", n, record, names, image)
        print(f"built {n} entries in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows.append(measure(n, store, work / f"n{n}" / "manifest.jsonl"))
        print(json.dumps(rows[-1]), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work / f"n{n}")
    result = {"record_bytes": len(json.dumps(record)), "files_per_entry": len(names), "cpu_count": os.cpu_count(),
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'entries':>8} {'validate s':>10} {'plan s':>8} {'report s':>9} {'plan peak MB':>12} "
          f"{'report peak MB':>14} {'plan B/entry':>12}")
    for row in rows:
        print(f"{row['entries']:>8} {row['validate']['seconds']['validate']:>10.2f} {row['plan']['seconds']['plan']:>8.1f} "
              f"{row['report']['seconds']['report']:>9.1f} {row['plan']['peak_rss_bytes'] / 2**20:>12.0f} "
              f"{row['report']['peak_rss_bytes'] / 2**20:>14.0f} {row['plan_bytes_per_entry']:>12.0f}")


if __name__ == "__main__":
    main()
