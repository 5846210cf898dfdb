"""The real deployment path: a `prefect server` process, a `process` work pool with a worker process,
the `edit-chunk` deployment registered to it, and `imagic run --mode deployment` into S3 over HTTP. As on a
cluster, the worker cannot see the caller's folder (the manifest, given as a relative path, and the inputs):
it runs in a mount namespace with that folder hidden; inputs and the model are in S3.

Slow-ish (~2 min): every chunk run is a fresh Python process, as it is on Kubernetes.
"""

import hashlib
import json
import re
import signal
import time
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.cluster import LocalCluster, stop, wait_until

from tests.conftest import QUICK, draw_scene

POOL = "system-test-pool"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    """prefect server + process work pool + the edit-chunk deployment; S3 is conftest's moto server."""
    s3_env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
              "AWS_DEFAULT_REGION": "us-east-1", "OMP_NUM_THREADS": "1"}
    with LocalCluster(tmp_path_factory.mktemp("prefect-home"), s3_env, pool=POOL) as cluster:
        s3_client(cluster).create_bucket(Bucket="batch")
        yield cluster


@pytest.fixture(scope="module")
def s3_model(cluster, tiny_dir) -> str:
    """The tiny model in S3, as a cluster's workers get their weights (synced once into the model cache)."""
    for path in tiny_dir.rglob("*"):
        if path.is_file():
            s3_client(cluster).upload_file(str(path), "batch", f"models/tiny/{path.relative_to(tiny_dir).as_posix()}")
    return "s3://batch/models/tiny/"


def imagic_run(cluster, manifest: Path, output: str, model: str, *extra: str) -> subprocess.Popen:
    """`imagic run manifest.jsonl` started in the manifest's folder, as a user does."""
    args = [sys.executable, "-m", "imagic", "run", manifest.name, "--output", output, "--mode", "deployment",
            "--model", model, "--chunk-size", "1", "--max-in-flight", "2", *extra]
    return subprocess.Popen(args, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=manifest.parent)


def finish(process: subprocess.Popen, timeout: float = 400) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def write_manifest(cluster, folder: Path, count: int, extra: list[dict] = ()) -> Path:
    """A local manifest (in the caller's folder) of inputs in S3 (drawn there, uploaded)."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rows = [{"defaults": {"etas": [0.5, 1.0], "overrides": QUICK}}]
    for i in range(count):
        draw_scene(colours[i % 4], size=48 + 8 * i).save(folder / f"in-{i}.png")
        s3_client(cluster).upload_file(str(folder / f"in-{i}.png"), "batch", f"inputs/{folder.name}/in-{i}.png")
        rows.append({"id": f"e{i}", "image": f"s3://batch/inputs/{folder.name}/in-{i}.png",
                     "target_text": "a blue circle"})
    rows += extra
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def s3_objects(cluster, prefix: str) -> dict[str, str]:
    """key → ETag under s3://batch/<prefix>/."""
    pages = s3_client(cluster).get_paginator("list_objects_v2").paginate(Bucket="batch", Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def chunk_runs(cluster) -> list:
    """Every edit-chunk flow run the server knows."""
    out = subprocess.run([sys.executable, "-c", LIST_RUNS], env=cluster.env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


LIST_RUNS = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["edit-chunk"])))
print(json.dumps([[str(r.id), r.state.type.value if r.state else None] for r in runs]))
"""


def records(objects: dict) -> set[str]:
    return {key.split("/")[0] for key in objects if key.endswith("/record.json") and key.count("/") == 1}


def test_deployment_mode_finishes_then_recomputes_nothing(cluster, tmp_path, s3_model):
    missing = {"id": "missing", "image": "s3://batch/inputs/nope.png", "target_text": "a blue circle"}
    local = {"id": "local", "image": str(tmp_path / "in-0.png"), "target_text": "a blue circle"}
    manifest = write_manifest(cluster, tmp_path, 3, extra=[missing, local])
    worker = cluster.start_worker("worker-a", hide=(tmp_path,))
    peek = cluster.spawn(["json.tool", str(manifest)], "peek", hide=(tmp_path,))  # what the worker sees there
    assert peek.wait(30) != 0 and "No such file" in (cluster.home / "peek.log").read_text()
    try:
        output = finish(imagic_run(cluster, manifest, "s3://batch/full", s3_model))
        assert "3 succeeded, 2 failed, 0 skipped" in output
        objects = s3_objects(cluster, "full")
        assert records(objects) == {"e0", "e1", "e2"}
        # the manifest, staged for the pods (content hash in its name), and each chunk's own entries
        assert [k for k in objects if k.startswith("_manifests/")] == [
            f"_manifests/manifest-{hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]}.jsonl"]
        assert len([k for k in objects if "/chunks/" in k]) == 5
        # a local path in deployment mode: that entry's error names the setting that allows it
        refused = json.loads(_get(cluster, "full/local/error.json"))["error"]
        assert refused["reason"] == "input_not_allowed" and "IMAGIC_ALLOWED_INPUTS" in refused["message"]
        assert {"e0/eta-0.50_seed-0.png", "e0/eta-1.00_seed-0.png", "e0/contact_sheet.png",
                "e0/artifacts/embeddings.safetensors", "missing/error.json"} <= set(objects)
        error = json.loads(_get(cluster, "full/missing/error.json"))["error"]
        assert error["reason"] == "input_unreadable" and "test-secret" not in json.dumps(error)
        leaked = [k for k in objects if k.endswith(".json") and b"test-secret" in _get(cluster, f"full/{k}")]
        leaked += [p.name for p in cluster.home.glob("*.log") if "test-secret" in p.read_text(errors="replace")]
        assert not leaked  # no credentials in records, reports or the server's and worker's logs
        runs_after_first = chunk_runs(cluster)
        assert len(runs_after_first) == 5 and {state for _, state in runs_after_first} == {"COMPLETED"}

        output = finish(imagic_run(cluster, manifest, "s3://batch/full", s3_model))
        # Only the failed entries are tried again; the finished ones are neither recomputed nor rewritten.
        assert "0 succeeded, 2 failed, 3 skipped" in output
        assert len(chunk_runs(cluster)) == len(runs_after_first) + 2
        again = s3_objects(cluster, "full")
        kept = lambda objects: {k: v for k, v in objects.items()  # noqa: E731
                                if not k.startswith(("_batches", "missing", "local", "_catalogue"))}
        assert kept(again) == kept(objects)
        # … and what it learnt of their records is in the catalogue, so the next re-run reads none of them
        lines = [json.loads(line) for key in again if key.startswith("_catalogue/")
                 for line in _get(cluster, f"full/{key}").splitlines()]
        assert sorted(line["folder"] for line in lines) == ["e0", "e1", "e2"] and "_catalogue" not in str(objects)
    finally:
        stop(worker)


def test_a_worker_killed_mid_batch_strands_nothing_the_parent_runs_its_chunk_again(cluster, tmp_path, s3_model):
    """SIGKILL of the worker and its chunk run: the run stays Running until its heartbeats stop and the
    automation of flows/zombies.py sets it Crashed; the parent, still waiting, runs that chunk again on the
    next worker once the dead run's claims lapse. The batch ends Completed, each entry edited once."""
    manifest = write_manifest(cluster, tmp_path, 4)
    runs_before = Counter(state for _, state in chunk_runs(cluster))
    worker = cluster.start_worker("worker-b", hide=(tmp_path,))
    parent = imagic_run(cluster, manifest, "s3://batch/killed", s3_model, "--chunk-size", "2")
    try:
        first = wait_until(lambda: records(s3_objects(cluster, "killed")), 300, "the first record", 0.2)
    finally:  # the worker and its running chunk, mid-chunk, with no word to anyone: a node lost
        doomed = psutil.Process(worker.pid).children(recursive=True)  # flow runs outside its process group too
        for process in doomed:
            process.kill()
        stop(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    before = s3_objects(cluster, "killed")
    assert first <= records(before) < {"e0", "e1", "e2", "e3"}

    worker = cluster.start_worker("worker-c", hide=(tmp_path,))
    try:
        output = finish(parent, timeout=600)
    finally:
        stop(worker)
    waited = time.monotonic() - killed_at
    after = s3_objects(cluster, "killed")
    assert "4 succeeded, 0 failed, 0 skipped" in output, output
    assert records(after) == {"e0", "e1", "e2", "e3"} and not [k for k in after if k.endswith("error.json")]
    for entry in records(before):  # finished before the kill: untouched
        assert after[f"{entry}/record.json"] == before[f"{entry}/record.json"]
    states = Counter(state for _, state in chunk_runs(cluster)) - runs_before
    assert states == {"CRASHED": 1, "COMPLETED": 2}, states  # the dead run, then both chunks
    print(f"the parent ended {waited:.0f} s after the kill")


def _get(cluster, key: str) -> bytes:
    return s3_client(cluster).get_object(Bucket="batch", Key=key)["Body"].read()


def s3_client(cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="test-key", aws_secret_access_key="test-secret")


def test_a_submitted_batch_runs_without_its_caller_and_is_followed_from_the_api(cluster, tmp_path, s3_model):
    """`run --submit` stages the manifest, submits the parent to the pool and returns; the parent (a worker's
    flow run that cannot see the caller's folder) dispatches the chunks; `status --follow` waits for it."""
    manifest = write_manifest(cluster, tmp_path, 2)
    worker = cluster.start_worker("worker-d", limit=4, hide=(tmp_path,))
    try:
        submitted = imagic_run(cluster, manifest, "s3://batch/submitted", s3_model, "--submit")
        output = finish(submitted, timeout=60)
        run_id = re.search(r"flow run ([0-9a-f-]{36})", output).group(1)
        assert f"imagic status s3://batch/submitted --follow --run {run_id}" in " ".join(output.split())
        assert not records(s3_objects(cluster, "submitted"))  # it returned before any edit
        follow = subprocess.run([sys.executable, "-m", "imagic", "status", "s3://batch/submitted", "--follow",
                                 "--json"], env=cluster.env, capture_output=True, text=True, timeout=400)
        updates = [json.loads(line) for line in follow.stdout.splitlines()]
        assert follow.returncode == 0, follow.stdout + follow.stderr
        assert updates[-1]["state"] == "COMPLETED" and updates[-1]["flow_run_id"] == run_id
        assert "2 succeeded, 0 failed" in updates[-1]["message"]
        summary = subprocess.run([sys.executable, "-m", "imagic", "status", "s3://batch/submitted", "--json"],
                                 env=cluster.env, capture_output=True, text=True, check=True)
        assert json.loads(summary.stdout)["finished"] == 2
        assert records(s3_objects(cluster, "submitted")) == {"e0", "e1"}
    finally:
        stop(worker)
