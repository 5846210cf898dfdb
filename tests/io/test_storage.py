"""The output store: local folders, and S3 over real HTTP against moto's server (path-style, like MinIO)."""

import os
import time

import pytest

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


def test_one_s3_client_per_process_made_once_under_threads(s3_env):
    from concurrent.futures import ThreadPoolExecutor

    stores = [open_storage(f"s3://{s3_env}/p{i}") for i in range(32)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        clients = list(pool.map(lambda store: store.client, stores))
    assert len({id(client) for client in clients}) == 1
    stores[0].write_bytes("a.txt", b"x")
    assert open_storage(f"s3://{s3_env}").list() == ["p0/a.txt"]


def test_a_listing_fingerprints_what_it_is_asked_to_and_notices_a_rewrite(store):
    store.write_bytes("e1/record.json", b"{}")
    store.write_bytes("e1/a.png", b"png")
    first = dict(store.listing(name="record.json"))
    assert set(first) == {"e1/record.json", "e1/a.png"} and first["e1/record.json"]
    if isinstance(store, LocalStorage):
        assert first["e1/a.png"] is None  # a stat only where one is wanted
    store.write_bytes("e1/record.json", b'{"other": 1}')
    assert dict(store.listing(name="record.json"))["e1/record.json"] != first["e1/record.json"]


def test_partials_of_interrupted_writes_are_discarded_by_age_and_never_listed(store, tmp_path):
    store.write_bytes("e1/record.json", b"{}")
    if isinstance(store, S3Storage):  # a PUT appears whole or not at all
        assert store.discard_partials("e1") == 0 and store.list() == ["e1/record.json"]
        return
    old, fresh = tmp_path / "out" / "e1" / ".a.png.x1.partial", tmp_path / "out" / "e1" / "artifacts" / ".b.y2.partial"
    fresh.parent.mkdir()
    old.write_bytes(b"half"), fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.list() == ["e1/record.json"]
    assert store.discard_partials("e1", older_than_s=3600) == 1 and not old.exists() and fresh.exists()
    assert store.discard_partials("e1") == 1 and not fresh.exists()
    assert store.read_bytes("e1/record.json") == b"{}"


def test_a_key_naming_one_object_discards_only_that_objects_partials(tmp_path):
    store = LocalStorage(tmp_path / "out")
    store.write_bytes("metadata.jsonl", b"{}\n")
    own, other = tmp_path / "out" / ".metadata.jsonl.k1ll3d.partial", tmp_path / "out" / "e1" / ".a.png.x1.partial"
    other.parent.mkdir()
    own.write_bytes(b"half"), other.write_bytes(b"half")
    assert store.discard_partials("metadata.jsonl") == 1 and not own.exists() and other.exists()
