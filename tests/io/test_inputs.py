"""Reading an input's bytes: paths, file://, s3:// and http(s)://, bounded in bytes and time."""

import http.server
import threading

import pytest

from imagic.io.inputs import read_uri
from imagic.io.storage import StorageError, open_storage


def serve(folder, seen: list | None = None) -> http.server.ThreadingHTTPServer:
    """A static file server over `folder` on a free port; GETs' (Host, Authorization) go into `seen`."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            if seen is not None:
                seen.append((self.headers.get("Host"), self.headers.get("Authorization")))
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_read_uri_from_s3_path_and_http(s3_env, tmp_path):
    open_storage(f"s3://{s3_env}").write_bytes("img/a.png", b"abc")
    assert read_uri(f"s3://{s3_env}/img/a.png") == b"abc"
    (tmp_path / "b.png").write_bytes(b"def")
    assert read_uri(str(tmp_path / "b.png")) == b"def" and read_uri(f"file://{tmp_path}/b.png") == b"def"

    seen = []
    server = serve(tmp_path, seen)
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


def test_an_input_fingerprint_is_what_a_read_saw_and_costs_one_listing_per_s3_folder(s3_env, tmp_path, monkeypatch):
    import os

    from imagic.io import inputs
    from imagic.io.inputs import input_fingerprints, read_input
    from imagic.io.storage import S3Storage

    store = open_storage(f"s3://{s3_env}")
    for name in ("a.png", "b.png", "c.png"):
        store.write_bytes(f"img/{name}", name.encode())
    (tmp_path / "d.png").write_bytes(b"ddd")
    listings = []
    listing = S3Storage.listing
    monkeypatch.setattr(S3Storage, "listing", lambda self, prefix="", **k: listings.append(prefix)
                        or listing(self, prefix, **k))
    uris = [f"s3://{s3_env}/img/{n}" for n in ("a.png", "b.png", "c.png", "gone.png")] + [str(tmp_path / "d.png")]
    found = input_fingerprints(uris)
    assert listings == ["img/"] and found[uris[3]] is None  # one listing for the folder; a missing one is None
    assert all(found[uri] == read_input(uri)[1] is not None for uri in uris[:3] + uris[4:])

    (tmp_path / "d.png").write_bytes(b"other")
    os.utime(tmp_path / "d.png", ns=(1, 1))
    store.write_bytes("img/a.png", b"other")
    later = input_fingerprints(uris)
    assert later[uris[0]] != found[uris[0]] and later[uris[4]] != found[uris[4]] and later[uris[1]] == found[uris[1]]

    server = serve(tmp_path)  # HEAD answers Last-Modified and Content-Length
    try:
        web = f"http://127.0.0.1:{server.server_port}/d.png"
        assert input_fingerprints([web])[web] == read_input(web)[1] is not None
        assert input_fingerprints([web + "x"])[web + "x"] is None
    finally:
        server.shutdown()
    assert inputs.input_fingerprints(["http://127.0.0.1:9/x.png"]) == {"http://127.0.0.1:9/x.png": None}
