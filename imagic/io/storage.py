"""One small storage interface: local folders and S3-compatible stores (AWS, MinIO).

Keys are POSIX paths relative to the store's root (`<entry_id>/record.json`). Writes are atomic: a
reader sees a whole object or none, so a finished-looking output is never half-written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mimetypes
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Protocol


class StorageError(OSError):
    """A read or write that failed, with a reason a person can act on (never credentials).

    `transient` says whether trying again can help (a 503, a dropped connection) or not (a missing file,
    no such bucket, access denied): callers retry only the former.
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def is_transient(error: BaseException | None) -> bool:
    """Worth retrying: a transient StorageError (not a missing object, a bad URI or a validation error)."""
    return isinstance(error, StorageError) and error.transient


# S3 error codes that say the request itself is wrong: retrying cannot help.
_PERMANENT_S3_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound", "AccessDenied", "403", "InvalidAccessKeyId",
                       "SignatureDoesNotMatch", "InvalidBucketName", "AllAccessDisabled", "PreconditionFailed"}
LOCK_SUFFIX = ".lock"  # a local store's lock files, beside what they guard; never listed
# Objects are readable by the group and others, as a web server or a colleague expects (not mkstemp's 0600).
FILE_MODE = 0o644
STALE_PARTIAL_S = 3600.0  # a `.partial` this old in a shared folder is a dead writer's: no write takes an hour


class Storage(Protocol):
    # Reads worth running at once: S3's latency hides behind threads; a local disk's reads are µs, and threads
    # would only contend for the GIL (plan of 1,000 finished entries: 1.36 s with 16 threads, 1.05 s with 1).
    read_concurrency: int

    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> bool:
        """Write `data`; with `if_absent`, only if nothing is there yet; with `if_version`, only if the object is
        still the one `read_versioned` saw (a compare-and-swap). True if this call wrote it."""
        ...

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(content, version) of an object, (None, None) if there is none: what `if_version` compares."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove an object; nothing to do when there is none."""
        ...

    def discard_partials(self, prefix: str, *, older_than_s: float = 0.0) -> int:
        """Remove what writes interrupted under `prefix` left (a local store's `.partial` files, never listed,
        never read); returns how many. A prefix naming one object (`metadata.jsonl`) means that object's own
        partials only. Only for a prefix nobody else is writing into now, or with `older_than_s` longer than
        any write takes. S3 has none: a PUT appears whole or not at all."""
        ...

    def list(self, prefix: str = "") -> list[str]: ...

    def walk(self, prefix: str = "") -> Iterator[str]:
        """The keys under `prefix`, one at a time, in no order (a 100k-entry batch has over a million)."""
        ...

    def listing(self, prefix: str = "", *, name: str | None = None) -> Iterator[tuple[str, str | None]]:
        """`walk`, each key with its *fingerprint* — what a listing says of an object's content without reading
        it (S3: the ETag; a local file: size and mtime), so that a changed object is noticed without reading
        it — for keys whose file name is `name` (every key when None; the rest get None: a local fingerprint
        costs a stat)."""
        ...

    def url_for(self, key: str) -> str: ...

    def share_url(self, key: str, expires_s: int = ...) -> str:
        """A link a browser can open (a presigned URL for S3)."""
        ...


def _resolve(key: str) -> str:
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"storage key {key!r} must be a relative path without '..'")
    return path.as_posix()


class LocalStorage:
    read_concurrency = 1

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / _resolve(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as err:
            raise StorageError(f"{self.url_for(key)}: cannot read ({err.strerror or err})") from err

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> bool:
        if if_version is not None:
            with self._locked(key):  # the compare and the swap, with no other writer of this key between
                if self.read_versioned(key)[1] != if_version:
                    return False
                return self.write_bytes(key, data)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(partial, FILE_MODE & ~_UMASK)
            if if_absent:
                try:
                    os.link(partial, path)  # atomic create-if-absent
                except FileExistsError:
                    return False
            else:
                os.replace(partial, path)
            return True
        finally:
            Path(partial).unlink(missing_ok=True)

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as err:
            raise StorageError(f"{self.url_for(key)}: cannot read ({err.strerror or err})") from err
        return data, hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self, key: str):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}{LOCK_SUFFIX}"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as err:
            raise StorageError(f"{self.url_for(key)}: cannot delete ({err.strerror or err})") from err

    def discard_partials(self, prefix: str, *, older_than_s: float = 0.0) -> int:
        base, removed, now = self._path(prefix) if prefix else self.root, 0, time.time()
        if base.is_file():  # `_write_atomic`'s partials of this one file sit beside it, not below it
            walked = [(str(base.parent), [], [p.name for p in base.parent.glob(f".{base.name}.*.partial")])]
        else:
            walked = os.walk(base)
        for folder, _, files in walked:
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if name.endswith(".partial") and now - os.stat(path).st_mtime >= older_than_s:
                        os.unlink(path)
                        removed += 1
                except OSError:  # its write finished meanwhile, or not this process's to remove
                    continue
        return removed

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.walk(prefix))

    def walk(self, prefix: str = "") -> Iterator[str]:
        # os.walk and string joins: pathlib's rglob and relative_to cost 35 µs a key (50 s for 1.4 M keys).
        root = os.path.normpath(self.root)
        base = os.path.normpath(os.path.join(root, prefix)) if prefix else root
        for folder, _, files in os.walk(base):
            relative = os.path.relpath(folder, root)
            head = "" if relative == "." else relative.replace(os.sep, "/") + "/"
            yield from (head + name for name in files if not name.endswith((".partial", LOCK_SUFFIX)))

    def listing(self, prefix: str = "", *, name: str | None = None) -> Iterator[tuple[str, str | None]]:
        for key in self.walk(prefix):
            if name is not None and key.rpartition("/")[2] != name:
                yield key, None
                continue
            try:
                yield key, file_fingerprint(os.stat(os.path.join(self.root, key)))
            except FileNotFoundError:  # removed since it was listed
                continue

    def url_for(self, key: str) -> str:
        return str(self._path(key))

    def share_url(self, key: str, expires_s: int = 0) -> str:
        """A link a browser on this machine opens."""
        return self._path(key).resolve().as_uri()


def file_fingerprint(info: os.stat_result) -> str:
    """A local file's fingerprint: what changes when its content is replaced, read without reading it."""
    return f"{info.st_size}:{info.st_mtime_ns}"


def compare_and_swap(store: Storage, key: str, update: Callable[[bytes | None], bytes], *, tries: int = 20) -> None:
    """Replace an object shared by concurrent writers with `update(its content)` (None when there is none):
    read it with its version, write only if it is still that version (S3: If-Match on the ETag; local: under
    a lock), and start again after a short random wait when another writer came between."""
    for attempt in range(tries):
        earlier, version = store.read_versioned(key)
        merged = update(earlier)
        if merged == earlier:
            return
        if version is None:
            written = store.write_bytes(key, merged, if_absent=True)
        else:
            written = store.write_bytes(key, merged, if_version=version)
        if written:
            return
        time.sleep(min(2.0, 0.05 * 2**attempt) * random.random())
    raise StorageError(f"{store.url_for(key)}: changed by other writers {tries} times in a row", transient=True)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask can only be read by setting it


class S3Storage:
    """boto3 with botocore `standard` retries; path-style addressing when an endpoint is set (MinIO).

    Credentials and endpoint come from the usual AWS sources (env, profile, role); `AWS_ENDPOINT_URL`
    points it at MinIO or another S3-compatible store.
    """

    read_concurrency = 16

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self.endpoint_url)
        return self._client

    def _key(self, key: str) -> str:
        key = _resolve(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, action: str, where: str, err: Exception) -> StorageError:
        """The real cause (no bucket, access denied, a 503 after retries), never the credentials."""
        error = (getattr(err, "response", None) or {}).get("Error", {})  # None on some connection errors
        code = error.get("Code", type(err).__name__)
        detail = f"{code}: {error['Message']}" if error.get("Message") else code
        if code == "NoSuchBucket":
            detail = f"no bucket {self.bucket!r} at {self.endpoint_url or 'AWS'}"
        return StorageError(f"s3://{self.bucket}/{where}: cannot {action} ({detail})",
                            transient=code not in _PERMANENT_S3_CODES)

    def read_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return self.get(key, max_bytes=max_bytes)[0]

    def get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """(content, fingerprint: the ETag) of an object, at most `max_bytes` of it."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise StorageError(f"s3://{self.bucket}/{self._key(key)}: {response['ContentLength']:,} bytes, "
                                   f"over the limit of {max_bytes:,}")
            return response["Body"].read(), response["ETag"]
        except StorageError:
            raise
        except Exception as err:  # botocore's ClientError, connection errors, …
            raise self._error("read", self._key(key), err) from err

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None) -> bool:
        extra = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_version} if if_version is not None else {}
        # A ContentType, so that a browser shows the index, images and JSON instead of downloading them.
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        if key.endswith(".jsonl"):
            content_type = "application/jsonl"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type,
                                   **extra)
            return True
        except Exception as err:
            code = getattr(err, "response", {}).get("Error", {}).get("Code")
            if extra and code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise self._error("write", self._key(key), err) from err

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]
        except Exception as err:
            if getattr(err, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None, None
            raise self._error("read", self._key(key), err) from err

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:
            if getattr(err, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error("check", self._key(key), err) from err

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            raise self._error("delete", self._key(key), err) from err

    def discard_partials(self, prefix: str, *, older_than_s: float = 0.0) -> int:
        return 0

    def download(self, key: str, path: Path) -> None:
        """Stream one object to a file (boto3's managed, multipart transfer: for multi-GB weights)."""
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(partial))
            os.replace(partial, path)
        except Exception as err:
            partial.unlink(missing_ok=True)
            raise self._error("download", self._key(key), err) from err

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.walk(prefix))

    def walk(self, prefix: str = "") -> Iterator[str]:
        return (key for key, _ in self.listing(prefix))

    def listing(self, prefix: str = "", *, name: str | None = None) -> Iterator[tuple[str, str | None]]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                yield from ((obj["Key"][strip:], obj["ETag"]) for obj in page.get("Contents", []))
        except Exception as err:
            raise self._error("list", full, err) from err

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def share_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A presigned GET link a browser opens without credentials (7 days: the SigV4 maximum)."""
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
                                                  ExpiresIn=expires_s)


_CLIENTS: dict[str | None, object] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client(endpoint_url: str | None):
    """The process's boto3 S3 client for an endpoint: made once, under a lock — boto3's default session is
    not thread-safe, its clients are — and shared by every store, input read and model sync."""
    with _CLIENTS_LOCK:
        if endpoint_url not in _CLIENTS:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": 5},
                s3={"addressing_style": "path" if endpoint_url else "auto"},
                # MinIO and older S3-compatible stores reject the newer default CRC checksums.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=32,  # the planning and reporting threads share it
            )
            _CLIENTS[endpoint_url] = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        return _CLIENTS[endpoint_url]


def open_storage(uri: str) -> Storage:
    """`s3://bucket/prefix` → S3Storage; `file://…` or a path → LocalStorage."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        return S3Storage(bucket, prefix)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}; use a path, file:// or s3://")
    return LocalStorage(uri.removeprefix("file://"))
