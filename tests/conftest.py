"""Shared fixtures: tiny SD pipelines built in code (seconds, CPU, offline)."""

import json
import os
import tempfile
import threading
import uuid

import pytest

# Built-in models materialise here, never in the user's cache. Set before imagic reads it.
os.environ.setdefault("IMAGIC_CACHE", tempfile.mkdtemp(prefix="imagic-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image, ImageDraw  # noqa: E402

from imagic import Editor, make_config  # noqa: E402
from imagic.toy.tiny import build_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def editor(tiny_dir):
    from imagic import load_pipeline

    return Editor(load_pipeline(str(tiny_dir)))


@pytest.fixture(scope="session")
def xl_editor():
    """A tiny SDXL-shaped pipeline (two text encoders, pooled embedding, added time ids), built in code."""
    from imagic import load_pipeline

    return Editor(load_pipeline("tiny-xl"))


@pytest.fixture(scope="session")
def cascade_editor():
    """A tiny DeepFloyd-IF-shaped cascade (16 px pixel-space base with a T5 encoder, 16→32 SR), built in code."""
    return Editor.from_pretrained("tiny-if")


@pytest.fixture(params=["sd", "xl"])
def family_editor(request):
    """The engine tests that must hold for every supported pipeline: SD 1.x/2.x and SDXL."""
    return request.getfixturevalue("editor" if request.param == "sd" else "xl_editor")


@pytest.fixture(scope="session")
def toy_editor():
    """The shipped toy model (CPU, a second to load)."""
    from imagic import load_pipeline

    return Editor(load_pipeline("toy"))


# Few steps of everything, as manifest overrides: for plumbing tests, not quality.
QUICK = {"embedding_steps": 2, "finetune_steps": 2, "num_inference_steps": 2}


@pytest.fixture(scope="session")
def prefect():
    """A temporary Prefect API server for the whole session (Prefect's own test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def quick_config():
    """Few steps of everything: for plumbing, not quality."""

    def make(preset="community", **overrides):
        defaults = dict(embedding_steps=6, finetune_steps=6, num_inference_steps=4)
        if preset == "community":
            defaults["save_full_delta"] = True
        return make_config(preset, **{**defaults, **overrides})

    return make


def draw_scene(color=(200, 30, 30), background=(240, 240, 240), size=64):
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=color)
    return image


def jsonl_manifest(path, images: dict[str, str], overrides: dict = QUICK, target_text: str = "a blue circle"):
    """A JSONL manifest at `path`: entry id → image, each at η 1.0 with `overrides`. Returns `path`."""
    lines = [{"defaults": {"etas": [1.0], "overrides": overrides}}]
    lines += [{"id": entry_id, "image": image, "target_text": target_text} for entry_id, image in images.items()]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def scene():
    return draw_scene()


@pytest.fixture(scope="session")
def s3_endpoint():
    """S3 over real HTTP: moto's server in a thread (path-style, like MinIO)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minio-user")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-123")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import boto3

    bucket = f"bucket-{uuid.uuid4().hex[:16]}"  # a fresh one per test (an object's id is reused once freed)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def hostile_http():
    """An HTTP server with hostile routes: /drip (a byte every 0.25 s), /big (5,000 bytes, no length),
    /declared (claims 1 GB), /away (a redirect to the cloud metadata address); anything else 404."""
    import http.server
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/drip":
                self.send_response(200)
                self.end_headers()
                for _ in range(20):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.25)
            elif path == "/big":
                self.send_response(200)
                self.end_headers()  # no Content-Length: only streaming can tell
                self.wfile.write(b"x" * 5000)
            elif path == "/declared":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
            elif path.startswith("/away"):
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def s3_faults(s3_env, s3_endpoint, monkeypatch):
    """`start(fail=, lose=)`: S3 through a proxy in front of moto that answers a share of requests 500
    (InternalError, without doing them) and does another share but loses the answer (the connection closes
    before a byte of it), drawn from a seeded generator; this process's S3 traffic then goes through it.
    `start()` again changes the shares (0, 0: a clean store)."""
    import http.client
    import http.server
    import random

    shares = {"fail": 0.0, "lose": 0.0}
    draw, lock = random.Random(20), threading.Lock()
    target = s3_endpoint.removeprefix("http://")

    class Relay(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def relay(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                roll = draw.random()
            if roll < shares["fail"]:
                fault = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                self.send_response(500)
                self.send_header("Content-Length", str(len(fault)))
                self.end_headers()
                self.wfile.write(fault)
                return
            upstream = http.client.HTTPConnection(target, timeout=30)
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            answer = upstream.getresponse()
            data = answer.read()
            upstream.close()
            if roll < shares["fail"] + shares["lose"]:
                self.close_connection = True  # done, but the client never hears
                return
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    self.send_header(name, value)
            # HEAD: the object's length, as the store said it
            self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")

    def start(fail: float = 0.0, lose: float = 0.0) -> None:
        shares.update(fail=fail, lose=lose)

    yield start
    server.shutdown()
