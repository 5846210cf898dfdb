"""The parent's work as a batch grows: a re-run over N finished entries (real-shaped records, cloned from a
real edit of the toy model), in a local store. Each phase runs in a fresh process that imports what the parent
flow imports (flows.bulk_edit: Prefect, not torch), so its seconds and peak RSS are its own:

    validate     read and validate the manifest (N entries)
    plan_first   validate + plan with no catalogue yet: every record read (and its catalogue line written)
    plan         validate + plan of a re-run: one listing and the catalogue, no record read, no input re-hashed
    report       validate + plan + the batch's report, paged index, Parquet and metadata.jsonl
    collect      validate + read the records of all N entries (summaries held), as a first run does after editing
    dispatch     per chunk of 8: the parent writes its slice, the chunk run reads it back (seconds a chunk)

    python benchmarks/scale.py --sizes 1000,10000 --s3 10000   # writes benchmarks/results/scale.json
    python benchmarks/scale.py --sizes 100000 --keep /data/scale   # 100k: 1.6 GB of records, 1.4 M files

The parent's memory per finished entry is (RSS holding the plan − RSS holding the validated entries) / N:
what the plan costs beyond the manifest's own entries (those cost `entries_bytes_per_entry`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
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
    shutil.copy2(REPO / "examples" / "toy" / "red-circle-on-black.png", image)  # its mtime too: a stable fingerprint
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


def measure_s3(n: int, work: Path, record: dict, names: list[str]) -> dict:
    """N finished entries in S3 over HTTP (moto's server): the input in the bucket, listed by its folder."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "scale", "AWS_SECRET_ACCESS_KEY": "scale",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        client.create_bucket(Bucket="scale")
        image = work / "input.png"
        etag = client.put_object(Bucket="scale", Key="inputs/input.png", Body=image.read_bytes())["ETag"]
        uri = "s3://scale/inputs/input.png"
        cloned = {**record, "input": {**record["input"], "uri": uri, "fingerprint": etag}}
        text = json.dumps(cloned)

        # Built inside moto's backend (its server runs in this process): over HTTP it takes 103 PUTs/s, 23 min
        # for 10k entries. Only the build skips HTTP; every phase measured reads the bucket over HTTP.
        from moto.backends import get_backend
        from moto.core import DEFAULT_ACCOUNT_ID

        bucket = get_backend("s3")[DEFAULT_ACCOUNT_ID]["global"]
        started = time.perf_counter()
        for i in range(n):
            entry_id = f"e{i:06d}"
            for name in names:
                body = (text.replace('"real"', f'"{entry_id}"').replace("/real/", f"/{entry_id}/").encode()
                        if name == "record.json" else b"")
                bucket.put_object("scale", f"out/{entry_id}/{name}", body)
        print(f"built {n} entries in S3 in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        manifest = work / f"s3-{n}.jsonl"
        manifest.write_text("".join(json.dumps({"id": f"e{i:06d}", "image": uri, "target_text": TARGET}) + "\n"
                                    for i in range(n)))
        return measure(n, "s3://scale/out", manifest, env)
    finally:
        server.stop()


def peak_rss() -> int:
    """This process's peak RSS: VmHWM, which starts afresh at exec (getrusage's ru_maxrss keeps the forking
    parent's, here the process that ran a toy edit with torch loaded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


PHASES = ("validate", "plan_first", "plan", "report", "collect", "dispatch")
CHUNKS = 200  # chunk slices written and read back by the dispatch phase


def phase(name: str, store_uri: str, manifest: Path) -> dict:
    """One phase in this process (run by `--phase`): seconds of its steps, and the process's peak RSS."""
    import flows.bulk_edit  # noqa: F401  what the parent flow's process holds before it reads anything
    from imagic.batch.catalogue import update_catalogue
    from imagic.batch.manifest import entries_jsonl, read_entries_jsonl, read_manifest_text, runnable, validate_manifest
    from imagic.batch.outputs import chunk_slice_key
    from imagic.batch.plan import chunk, plan
    from imagic.batch.report import batch_report, run_info, run_records, write_report
    from imagic.batch.run import read_summaries
    from imagic.engine.identity import known_model_sha256
    from imagic.io.storage import open_storage

    imported = psutil.Process().memory_info().rss
    seconds, store = {}, open_storage(store_uri)
    requests: dict[str, int] = {}  # S3 requests by operation: moto's seconds are moto's, these are ours
    if hasattr(store, "client"):
        def count(event_name: str, **_) -> None:
            operation = event_name.rsplit(".", 1)[-1]
            requests[operation] = requests.get(operation, 0) + 1

        store.client.meta.events.register("before-send.s3", count)

    def timed(step, work):
        started = time.perf_counter()
        result = work()
        seconds[step] = time.perf_counter() - started
        return result

    entries = timed("validate", lambda: runnable(*validate_manifest(read_manifest_text(str(manifest)), "jsonl")))
    held = {}
    if name in ("plan_first", "plan", "report"):
        planned = timed("plan", lambda: plan(entries, store, model="toy", model_hash=known_model_sha256("toy")))
        assert len(planned.done) == len(entries), (len(planned.done), len(planned.changed), len(planned.todo))
        assert bool(planned.catalogue) == (name == "plan_first"), len(planned.catalogue)
        timed("catalogue", lambda: update_catalogue(store, planned.catalogue))
        planned.catalogue.clear()
        held["plan"] = planned
    if name == "report":
        def records():
            return run_records(planned, rejected=[], edited=[], failed_before=[])

        run = run_info("run-1", str(manifest), store_uri, "toy", "failed")
        report = timed("report", lambda: batch_report("scale", records(), seconds=0.0, run=run))
        timed("write", lambda: write_report(store, report, records()))
    if name == "collect":
        held["records"] = timed("collect", lambda: read_summaries(entries, store))
    if name == "dispatch":
        chunks = chunk(entries, 8)[:CHUNKS]

        def write_and_read() -> list[float]:
            each = []
            for i, entries_of_chunk in enumerate(chunks):
                started = time.perf_counter()
                key = chunk_slice_key("scale", f"chunk-{i}")
                store.write_bytes(key, entries_jsonl(entries_of_chunk))
                assert len(read_entries_jsonl(store.read_bytes(key))) == len(entries_of_chunk)
                each.append(time.perf_counter() - started)
            return each

        # The median: a chunk's cost is a millisecond, where one scheduler hiccup would move a mean.
        seconds["per_chunk"] = statistics.median(timed("chunks", write_and_read))
    held_rss = psutil.Process().memory_info().rss  # with the phase's results still alive
    return {"seconds": seconds, "requests": requests, "peak_rss_bytes": peak_rss(),
            "rss_after_imports_bytes": imported, "rss_held_bytes": held_rss}


def measure(n: int, store_uri: str, manifest: Path, env: dict | None = None) -> dict:
    row = {"entries": n, "store": "s3" if store_uri.startswith("s3://") else "local"}
    if row["store"] == "local":
        shutil.rmtree(Path(store_uri) / "_catalogue", ignore_errors=True)  # plan_first plans without one
    for name in PHASES:
        out = subprocess.run([sys.executable, __file__, "--phase", name, "--store", store_uri, "--manifest",
                              str(manifest)], check=True, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO)})
        row[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {n} {name}: {json.dumps(row[name])}", file=sys.stderr)
    row["plan_bytes_per_entry"] = (row["plan"]["rss_held_bytes"] - row["validate"]["rss_held_bytes"]) / n
    row["entries_bytes_per_entry"] = (row["validate"]["rss_held_bytes"] - row["validate"]["rss_after_imports_bytes"]) / n
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--keep", type=Path, help="build the stores here and keep them (default: a temp folder)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: measure the stores built there before")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--s3", type=int, default=0, metavar="N",
                        help="also N entries in S3 over HTTP (moto's server in this process)")
    parser.add_argument("--store", help=argparse.SUPPRESS)
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
        rows.append(measure(n, str(store), work / f"n{n}" / "manifest.jsonl"))
        print(json.dumps(rows[-1]), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work / f"n{n}")
    if args.s3:
        rows.append(measure_s3(args.s3, work, record, names))
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"record_bytes": len(json.dumps(record)), "files_per_entry": len(names), "cpu_count": os.cpu_count(),
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'entries':>8} {'validate s':>10} {'plan₁ s':>8} {'plan s':>7} {'report s':>9} {'collect s':>9} "
          f"{'chunk ms':>8} {'plan peak MB':>12} {'report peak MB':>14} {'plan B/entry':>12}")
    for row in rows:
        print(f"{row['entries']:>8}{'' if row['store'] == 'local' else ' S3'} {row['validate']['seconds']['validate']:>10.2f} "
              f"{row['plan_first']['seconds']['plan']:>8.1f} {row['plan']['seconds']['plan']:>7.1f} "
              f"{row['report']['seconds']['report'] + row['report']['seconds']['write']:>9.1f} "
              f"{row['collect']['seconds']['collect']:>9.1f} {1000 * row['dispatch']['seconds']['per_chunk']:>8.1f} "
              f"{row['plan']['peak_rss_bytes'] / 2**20:>12.0f} {row['report']['peak_rss_bytes'] / 2**20:>14.0f} "
              f"{row['plan_bytes_per_entry']:>12.0f}")


if __name__ == "__main__":
    main()
