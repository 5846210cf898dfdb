"""Reading one input's bytes from wherever a manifest says it is — a path, file://, s3:// or http(s):// —
bounded in bytes and time, so that a hostile input costs at most what the operator allows."""

from __future__ import annotations

import base64
import os
import stat
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from imagic.io.redaction import redact_text, redact_uri
from imagic.io.storage import S3Storage, StorageError, file_fingerprint

DEFAULT_MAX_BYTES = 128 * 2**20  # a 40 MP 16-bit PNG; a hostile stream costs at most this much memory
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


def read_uri(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
    """The bytes of an input (see `read_input`)."""
    return read_input(uri, max_bytes=max_bytes, timeout_s=timeout_s)[0]


def read_input(uri: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bytes, str | None]:
    """(bytes, fingerprint) of an input: a path, file://, s3://bucket/key or http(s)://, bounded. The
    fingerprint is what `input_fingerprints` says of the same content later (None where the server says
    nothing that would change with it).

    At most `max_bytes` (checked before reading where the size is known, and while streaming), within
    `timeout_s` seconds in all (connect included); local paths must be regular files (not a FIFO, a device
    or /dev/zero); HTTP redirects may not leave the host. Errors never show credentials.
    """
    if uri.startswith(("http://", "https://")):
        return _read_http(uri, max_bytes, timeout_s)
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        return S3Storage(bucket).get(key, max_bytes=max_bytes)
    path = _local_path(uri)
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
    return data, file_fingerprint(info)


def input_fingerprints(uris: Iterable[str], *, timeout_s: float = 10.0) -> dict[str, str | None]:
    """The fingerprint of each input now, as cheaply as its kind allows: a stat for a local file, one listing
    per S3 folder (not a request per object), a HEAD for HTTP. None where it cannot be had (missing,
    unreachable, a server without ETag or Last-Modified): the caller reads that input instead."""
    found: dict[str, str | None] = {}
    folders: dict[tuple[str, str], list[str]] = defaultdict(list)
    web = []
    for uri in set(uris):
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            folders[(bucket, key.rpartition("/")[0])].append(uri)
        elif uri.startswith(("http://", "https://")):
            web.append(uri)
        else:
            try:
                found[uri] = file_fingerprint(os.stat(_local_path(uri)))
            except OSError:
                found[uri] = None
    for (bucket, folder), members in folders.items():
        try:
            listed = dict(S3Storage(bucket).listing(f"{folder}/" if folder else ""))
        except (StorageError, ValueError):
            listed = {}
        found.update({uri: listed.get(uri[5:].partition("/")[2]) for uri in members})
    with ThreadPoolExecutor(max_workers=16) as pool:
        found.update(zip(web, pool.map(lambda uri: _http_fingerprint(uri, timeout_s), web)))
    return found


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _http_request(uri: str, method: str = "GET") -> urllib.request.Request:
    """The request for `uri`, credentials in the URL moved into a header: never into the host name the
    resolver sees."""
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    request = urllib.request.Request(urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), method=method)
    if parts.username is not None:
        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _header_fingerprint(headers) -> str | None:
    """An HTTP response's fingerprint: its ETag, else Last-Modified with the length."""
    if headers.get("ETag"):
        return headers["ETag"]
    if headers.get("Last-Modified"):
        return f"{headers['Last-Modified']}|{headers.get('Content-Length', '')}"
    return None


def _http_fingerprint(uri: str, timeout_s: float) -> str | None:
    try:
        with urllib.request.build_opener(_SameHostRedirects).open(_http_request(uri, "HEAD"),
                                                                 timeout=timeout_s) as response:
            return _header_fingerprint(response.headers)
    except (StorageError, urllib.error.URLError, TimeoutError, OSError, ValueError):
        return None


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme and host: never to another host, scheme or internal service."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlsplit(req.full_url), urlsplit(newurl)
        if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
            raise StorageError(f"{redact_uri(req.full_url)}: redirected to another host ({redact_uri(newurl)}); "
                               "not followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_http(uri: str, max_bytes: int, timeout_s: float) -> tuple[bytes, str | None]:
    shown = redact_uri(uri)
    request = _http_request(uri)
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
            return b"".join(chunks), _header_fingerprint(response.headers)
    except StorageError:
        raise
    except urllib.error.HTTPError as err:
        raise StorageError(f"{shown}: HTTP {err.code} {err.reason}",
                           transient=err.code in (408, 429) or err.code >= 500) from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StorageError(f"{shown}: unreachable ({redact_text(str(reason), uri)})", transient=True) from err
