"""Local folders, and S3 over real HTTP against moto's server (path-style, like MinIO)."""

import http.server
import threading

import pytest

from imagic.io.inputs import read_uri
from imagic.io.storage import LocalStorage, S3Storage, StorageError, open_storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    bucket = request.getfixturevalue("s3_env")
    return open_storage(f"s3://{bucket}/runs/batch-1")


def test_write_read_list_exists(store):
    assert not store.exists("e1/record.json")
    assert store.write_bytes("e1/record.json", b"{}")
    store.write_bytes("e1/eta-0.70_seed-0.png", b"png")
    store.write_bytes("e2/record.json", b"[]")
    assert store.exists("e1/record.json") and store.read_bytes("e2/record.json") == b"[]"
    assert store.list() == ["e1/eta-0.70_seed-0.png", "e1/record.json", "e2/record.json"]
    assert store.list("e1/") == ["e1/eta-0.70_seed-0.png", "e1/record.json"]


def test_if_absent_never_overwrites(store):
    assert store.write_bytes("e1/record.json", b"first", if_absent=True)
    assert not store.write_bytes("e1/record.json", b"second", if_absent=True)
    assert store.read_bytes("e1/record.json") == b"first"
    assert store.write_bytes("e1/record.json", b"third")  # a plain write replaces
    assert store.read_bytes("e1/record.json") == b"third"


def test_missing_object_is_a_storage_error_without_secrets(store):
    with pytest.raises(StorageError) as caught:
        store.read_bytes("nope/record.json")
    message = str(caught.value)
    assert "nope/record.json" in message and "very-secret-key-123" not in message and "minio-user" not in message


def test_keys_cannot_escape_the_root(store):
    for key in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="relative path"):
            store.write_bytes(key, b"x")


def test_s3_uses_path_style_and_the_endpoint(s3_env, s3_endpoint):
    store = open_storage(f"s3://{s3_env}/p")
    assert isinstance(store, S3Storage) and store.endpoint_url == s3_endpoint
    assert store.client.meta.config.s3["addressing_style"] == "path"
    assert store.client.meta.config.retries["mode"] == "standard"
    assert store.url_for("e/record.json") == f"s3://{s3_env}/p/e/record.json"


def test_read_uri_from_s3_path_and_http(s3_env, tmp_path):
    open_storage(f"s3://{s3_env}").write_bytes("img/a.png", b"abc")
    assert read_uri(f"s3://{s3_env}/img/a.png") == b"abc"
    (tmp_path / "b.png").write_bytes(b"def")
    assert read_uri(str(tmp_path / "b.png")) == b"def" and read_uri(f"file://{tmp_path}/b.png") == b"def"

    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            seen.append((self.headers.get("Host"), self.headers.get("Authorization")))
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert read_uri(f"{base}/b.png") == b"def"
        with pytest.raises(StorageError, match=r"/missing.png\?size=2&X-Amz-Signature=REDACTED: HTTP 404") as caught:
            read_uri(f"{base}/missing.png?size=2&X-Amz-Signature=abc")
        assert "abc" not in str(caught.value)
        # user:password@ goes as a Basic header, never into the host name (the resolver once saw it).
        assert read_uri(f"http://user:hunter2@127.0.0.1:{server.server_port}/b.png") == b"def"
        assert seen[-1] == (f"127.0.0.1:{server.server_port}", "Basic dXNlcjpodW50ZXIy")
    finally:
        server.shutdown()
    with pytest.raises(StorageError, match="unreachable"):
        read_uri("http://127.0.0.1:9/x.png")


def test_unsupported_uri():
    with pytest.raises(ValueError, match="unsupported storage URI"):
        open_storage("gs://bucket/x")


def test_local_files_are_readable_by_others(tmp_path):
    """Colleagues and web servers read a shared output (mkstemp alone makes 0600 files)."""
    import os
    import stat

    store = LocalStorage(tmp_path / "out")
    store.write_bytes("e1/record.json", b"{}")
    store.write_bytes("e1/record2.json", b"{}", if_absent=True)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("record.json", "record2.json"):
        assert stat.S_IMODE((tmp_path / "out" / "e1" / name).stat().st_mode) == 0o644 & ~umask


def test_s3_errors_carry_the_real_cause_and_whether_to_retry(s3_env):
    from imagic.io.storage import is_transient

    with pytest.raises(StorageError) as missing_bucket:
        open_storage("s3://no-such-bucket/x").list()
    assert "no bucket 'no-such-bucket'" in str(missing_bucket.value) and not is_transient(missing_bucket.value)
    with pytest.raises(StorageError) as missing_key:
        open_storage(f"s3://{s3_env}").read_bytes("nope.png")
    assert "NoSuchKey" in str(missing_key.value) and not is_transient(missing_key.value)
    with pytest.raises(StorageError) as unreachable:
        S3Storage("b", endpoint_url="http://127.0.0.1:9").read_bytes("x")
    assert is_transient(unreachable.value)


def test_s3_objects_have_a_content_type_and_a_presigned_link(s3_env):
    import urllib.request

    store = open_storage(f"s3://{s3_env}/p")
    store.write_bytes("_batches/b/index.html", b"<p>hi</p>")
    head = store.client.head_object(Bucket=s3_env, Key="p/_batches/b/index.html")
    assert head["ContentType"] == "text/html"
    link = store.share_url("_batches/b/index.html")
    assert "X-Amz-Signature=" in link or "Signature=" in link
    with urllib.request.urlopen(link) as response:  # a browser needs no credentials
        assert response.read() == b"<p>hi</p>"


def test_local_reads_take_regular_files_only_and_within_the_limit(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # a read once waited forever for a writer
    for path in (fifo, "/dev/zero"):
        with pytest.raises(StorageError, match="not a regular file"):
            read_uri(str(path))
    sparse = tmp_path / "sparse.png"
    with sparse.open("wb") as f:
        f.truncate(2**30)  # 1 GiB that costs nothing on disk: refused before a byte is read
    with pytest.raises(StorageError, match="1,073,741,824 bytes, over the limit of 1,000"):
        read_uri(str(sparse), max_bytes=1000)


def test_http_reads_are_bounded_in_time_and_bytes_and_stay_on_their_host(hostile_http):
    import time

    started = time.monotonic()
    with pytest.raises(StorageError, match="took longer than 1 s"):
        read_uri(f"{hostile_http}/drip", timeout_s=1.0)
    assert time.monotonic() - started < 2.0
    with pytest.raises(StorageError, match="over the limit of 1,000 bytes"):
        read_uri(f"{hostile_http}/big", max_bytes=1000)
    with pytest.raises(StorageError, match="1,000,000,000 bytes, over the limit"):
        read_uri(f"{hostile_http}/declared")
    with pytest.raises(StorageError, match="redirected to another host"):
        read_uri(f"{hostile_http}/away")


def test_s3_reads_are_bounded(s3_env):
    store = open_storage(f"s3://{s3_env}")
    store.write_bytes("big.png", b"x" * 5000)
    with pytest.raises(StorageError, match="5,000 bytes, over the limit of 1,000"):
        read_uri(f"s3://{s3_env}/big.png", max_bytes=1000)


@pytest.mark.parametrize("uri, shown", [
    ("https://user:pw@host.example/a.png", "https://host.example/a.png"),
    ("https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ff",
     "https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
     "&X-Amz-Signature=REDACTED"),
    ("https://host/a.png?sig=1&sv=2&token=3", "https://host/a.png?sig=REDACTED&sv=2&token=REDACTED"),
    ("s3://bucket/a.png", "s3://bucket/a.png"),
    ("/data/a.png", "/data/a.png"),
])
def test_credentials_are_redacted_from_uris(uri, shown):
    from imagic.io.redaction import redact_uri

    assert redact_uri(uri) == shown
