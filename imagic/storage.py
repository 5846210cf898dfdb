"""One small storage interface: local folders and S3-compatible stores (AWS, MinIO); http(s) read-only.

Keys are POSIX paths relative to the store's root (`<entry_id>/record.json`). Writes are atomic: a
reader sees a whole object or none, so a finished-looking output is never half-written.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import stat
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit


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
# Objects are readable by the group and others, as a web server or a colleague expects (not mkstemp's 0600).
FILE_MODE = 0o644


class Storage(Protocol):
    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write `data`; with `if_absent`, only if nothing is there yet. True if this call wrote it."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[str]: ...

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
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / _resolve(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as err:
            raise StorageError(f"{self.url_for(key)}: cannot read ({err.strerror or err})") from err

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
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

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".partial"))

    def url_for(self, key: str) -> str:
        return str(self._path(key))

    def share_url(self, key: str, expires_s: int = 0) -> str:
        """A link a browser on this machine opens."""
        return self._path(key).resolve().as_uri()


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

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._client = client

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": 5},
                s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                # MinIO and older S3-compatible stores reject the newer default CRC checksums.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _key(self, key: str) -> str:
        key = _resolve(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, action: str, where: str, err: Exception) -> StorageError:
        """The real cause (no bucket, access denied, a 503 after retries), never the credentials."""
        error = getattr(err, "response", {}).get("Error", {})
        code = error.get("Code", type(err).__name__)
        detail = f"{code}: {error['Message']}" if error.get("Message") else code
        if code == "NoSuchBucket":
            detail = f"no bucket {self.bucket!r} at {self.endpoint_url or 'AWS'}"
        return StorageError(f"s3://{self.bucket}/{where}: cannot {action} ({detail})",
                            transient=code not in _PERMANENT_S3_CODES)

    def read_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            if max_bytes is not None and response["ContentLength"] > max_bytes:
                response["Body"].close()
                raise StorageError(f"s3://{self.bucket}/{self._key(key)}: {response['ContentLength']:,} bytes, "
                                   f"over the limit of {max_bytes:,}")
            return response["Body"].read()
        except StorageError:
            raise
        except Exception as err:  # botocore's ClientError, connection errors, …
            raise self._error("read", self._key(key), err) from err

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
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
            if if_absent and code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise self._error("write", self._key(key), err) from err

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:
            if getattr(err, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error("check", self._key(key), err) from err

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
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        except Exception as err:
            raise self._error("list", full, err) from err
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in keys)

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def share_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A presigned GET link a browser opens without credentials (7 days: the SigV4 maximum)."""
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
                                                  ExpiresIn=expires_s)


def open_storage(uri: str) -> Storage:
    """`s3://bucket/prefix` → S3Storage; `file://…` or a path → LocalStorage."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        return S3Storage(bucket, prefix)
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}; use a path, file:// or s3://")
    return LocalStorage(uri.removeprefix("file://"))


DEFAULT_MAX_BYTES = 128 * 2**20  # a 40 MP 16-bit PNG; a hostile stream costs at most this much memory
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


def read_uri(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """The bytes of an input: a path, file://, s3://bucket/key or http(s)://, bounded.

    At most `max_bytes` (checked before reading where the size is known, and while streaming), within
    `timeout_s` seconds in all (connect included); local paths must be regular files (not a FIFO, a device
    or /dev/zero); HTTP redirects may not leave the host. Errors never show credentials.
    """
    if uri.startswith(("http://", "https://")):
        return _read_http(uri, max_bytes, timeout_s)
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        return S3Storage(bucket).read_bytes(key, max_bytes=max_bytes)
    path = Path(uri.removeprefix("file://"))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise StorageError(f"{path}: not a regular file")
            if info.st_size > max_bytes:
                raise StorageError(f"{path}: {info.st_size:,} bytes, over the limit of {max_bytes:,}")
            data = stream.read(max_bytes + 1)
    except StorageError:
        raise
    except OSError as err:
        raise StorageError(f"{path}: cannot read ({err.strerror or err})") from err
    if data is None or len(data) > max_bytes:
        raise StorageError(f"{path}: over the limit of {max_bytes:,} bytes")
    return data


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme and host: never to another host, scheme or internal service."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            raise StorageError(f"{redact_uri(req.full_url)}: redirected to another host ({redact_uri(newurl)}); "
                               "not followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_http(uri: str, max_bytes: int, timeout_s: float) -> bytes:
    parts = urlsplit(uri)
    shown = redact_uri(uri)
    # Credentials in the URL go in a header, never into the host name the resolver sees.
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    request = urllib.request.Request(urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")))
    if parts.username is not None:
        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(_SameHostRedirects)
    deadline = time.monotonic() + timeout_s
    try:
        # The socket timeout bounds each wait; the deadline bounds the whole read (a server dripping bytes).
        with opener.open(request, timeout=min(timeout_s, 30.0)) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise StorageError(f"{shown}: {int(length):,} bytes, over the limit of {max_bytes:,}")
            chunks, size = [], 0
            while chunk := response.read1(min(_CHUNK, max_bytes + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise StorageError(f"{shown}: over the limit of {max_bytes:,} bytes")
                if time.monotonic() > deadline:
                    raise StorageError(f"{shown}: took longer than {timeout_s:g} s", transient=True)
            return b"".join(chunks)
    except StorageError:
        raise
    except urllib.error.HTTPError as err:
        raise StorageError(f"{shown}: HTTP {err.code} {err.reason}",
                           transient=err.code in (408, 429) or err.code >= 500) from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StorageError(f"{shown}: unreachable ({redact_text(str(reason), uri)})", transient=True) from err


# Query parameters that are credentials: presigned S3 (SigV4, SigV2), GCS, Azure SAS, and the usual names.
_SECRET_PARAMETERS = {"x-amz-signature", "x-amz-credential", "x-amz-security-token", "signature", "awsaccesskeyid",
                      "x-goog-signature", "x-goog-credential", "sig", "token", "access_token", "api_key", "apikey",
                      "key", "password", "secret"}


def redact_uri(uri: str) -> str:
    """The URI with credentials removed: `user:password@` and secret query parameters (values `REDACTED`)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        f"{name}={'REDACTED' if name.lower() in _SECRET_PARAMETERS else value}" if sep else name
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str, uri: str) -> str:
    """`text` (an error message) without the credentials that `uri` carries."""
    parts = urlsplit(uri)
    secrets = [parts.password, parts.username]
    secrets += [value for name, _, value in (p.partition("=") for p in parts.query.split("&"))
                if name.lower() in _SECRET_PARAMETERS]
    for secret in filter(None, secrets):
        text = text.replace(secret, "REDACTED")
    return text
