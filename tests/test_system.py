"""The real deployment path: a `prefect server` process, a `process` work pool with a worker process,
the `edit-chunk` deployment registered to it, and `imagic run --mode deployment` into S3 over HTTP.

Slow-ish (~2 min): every chunk run is a fresh Python process, as it is on Kubernetes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import draw_scene

REPO = Path(__file__).resolve().parents[1]
POOL = "system-test-pool"
QUICK = {"embedding_steps": 2, "finetune_steps": 2, "num_inference_steps": 2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """moto (S3 over HTTP) + prefect server + work pool + edit-chunk deployment; yields an env for processes."""
    from moto.server import ThreadedMotoServer

    home = tmp_path_factory.mktemp("prefect-home")
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, moto_port = moto.get_host_and_port()
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO",
           "AWS_ENDPOINT_URL": f"http://{host}:{moto_port}", "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1", "OMP_NUM_THREADS": "1"}
    port = api.rsplit(":", 1)[1].split("/")[0]
    log = open(home / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", port], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_until(lambda: _healthy(api), 120, "the Prefect server")
        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
                       env=env, check=True, capture_output=True)
        subprocess.run([sys.executable, "-c", DEPLOY.format(repo=str(REPO), pool=POOL)], env=env, check=True,
                       capture_output=True, cwd=REPO)
        cluster = {"env": env, "home": home, "api": api}
        s3_client(cluster).create_bucket(Bucket="batch")
        yield cluster
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        moto.stop()


DEPLOY = """
from flows.edit_chunk import edit_chunk
edit_chunk.from_source(source={repo!r}, entrypoint="flows/edit_chunk.py:edit_chunk").deploy(
    name="edit-chunk", work_pool_name={pool!r}, print_next_steps=False)
"""


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_worker(cluster, name: str) -> subprocess.Popen:
    log = open(cluster["home"] / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type",
                             "process", "--limit", "1", "--name", name], env=cluster["env"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def stop(process: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """The process and everything it started (the worker's flow-run processes)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    process.wait(60)


def imagic_run(cluster, manifest: Path, output: str, tiny_dir, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "imagic", "run", str(manifest), "--output", output, "--mode", "deployment",
            "--model", str(tiny_dir), "--chunk-size", "1", "--max-in-flight", "2"]
    return subprocess.Popen(args, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=REPO, **popen)


def finish(process: subprocess.Popen, timeout: float = 400) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def write_manifest(folder: Path, count: int, extra: list[dict] = ()) -> Path:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rows = [{"defaults": {"etas": [0.5, 1.0], "overrides": QUICK}}]
    for i in range(count):
        draw_scene(colours[i % 4], size=48 + 8 * i).save(folder / f"in-{i}.png")
        rows.append({"id": f"e{i}", "image": str(folder / f"in-{i}.png"), "target_text": "a blue circle"})
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
    out = subprocess.run([sys.executable, "-c", LIST_RUNS], env=cluster["env"], check=True, capture_output=True,
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


def test_deployment_mode_finishes_then_recomputes_nothing(cluster, tmp_path, tiny_dir):
    missing = {"id": "missing", "image": "s3://batch/inputs/nope.png", "target_text": "a blue circle"}
    manifest = write_manifest(tmp_path, 3, extra=[missing])
    worker = start_worker(cluster, "worker-a")
    try:
        output = finish(imagic_run(cluster, manifest, "s3://batch/full", tiny_dir))
        assert "3 succeeded, 1 failed, 0 skipped" in output
        objects = s3_objects(cluster, "full")
        assert records(objects) == {"e0", "e1", "e2"}
        assert {"e0/eta-0.50_seed-0.png", "e0/eta-1.00_seed-0.png", "e0/contact_sheet.png",
                "e0/artifacts/embeddings.safetensors", "missing/error.json"} <= set(objects)
        error = json.loads(_get(cluster, "full/missing/error.json"))["error"]
        assert error["reason"] == "input_unreadable" and "test-secret" not in json.dumps(error)
        runs_after_first = chunk_runs(cluster)
        assert len(runs_after_first) == 4 and {state for _, state in runs_after_first} == {"COMPLETED"}

        output = finish(imagic_run(cluster, manifest, "s3://batch/full", tiny_dir))
        # Only the failed entry is tried again; the finished ones are neither recomputed nor rewritten.
        assert "0 succeeded, 1 failed, 3 skipped" in output
        assert len(chunk_runs(cluster)) == len(runs_after_first) + 1
        again = s3_objects(cluster, "full")
        assert {k: v for k, v in again.items() if not k.startswith(("_batches", "missing"))} == \
               {k: v for k, v in objects.items() if not k.startswith(("_batches", "missing"))}
    finally:
        stop(worker)


def test_killing_the_worker_mid_batch_then_rerunning_loses_and_duplicates_nothing(cluster, tmp_path, tiny_dir):
    manifest = write_manifest(tmp_path, 4)
    worker = start_worker(cluster, "worker-b")
    parent = imagic_run(cluster, manifest, "s3://batch/killed", tiny_dir)
    try:
        first = wait_until(lambda: records(s3_objects(cluster, "killed")), 300, "the first record", 0.2)
    finally:
        stop(worker, signal.SIGKILL)  # the worker and its running chunk, mid-batch
        stop(parent, signal.SIGKILL)  # a parent waiting on a dead child never returns: the batch died
    before = s3_objects(cluster, "killed")
    assert first <= records(before) < {"e0", "e1", "e2", "e3"}

    worker = start_worker(cluster, "worker-c")
    try:
        output = finish(imagic_run(cluster, manifest, "s3://batch/killed", tiny_dir))
    finally:
        stop(worker)
    after = s3_objects(cluster, "killed")
    done_before = records(before)
    assert f"{4 - len(done_before)} succeeded, 0 failed, {len(done_before)} skipped" in output
    assert records(after) == {"e0", "e1", "e2", "e3"}
    assert not [k for k in after if k.endswith("error.json")]
    for entry in done_before:  # finished before the kill: untouched
        assert after[f"{entry}/record.json"] == before[f"{entry}/record.json"]
    report_key = next(k for k in after if k.endswith("report.json"))
    report = json.loads(_get(cluster, f"killed/{report_key}"))
    assert sorted([r["entry_id"] for r in report["entries"]] + report["skipped"]) == ["e0", "e1", "e2", "e3"]


def _get(cluster, key: str) -> bytes:
    return s3_client(cluster).get_object(Bucket="batch", Key=key)["Body"].read()


def s3_client(cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster["env"]["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="test-key", aws_secret_access_key="test-secret")
