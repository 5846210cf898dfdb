"""Credentials out of everything written or shown: URIs in records, keys, logs and error messages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

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


def uri_identity(uri: str) -> str:
    """What names a URI's object whoever signed it: the URI redacted, and for a signed URL (one with a secret
    query parameter) without its query — a presigned URL's date, expiry and signature change at every
    signing, its object does not."""
    if "://" not in uri or uri.startswith("file://"):
        return uri
    parts = urlsplit(redact_uri(uri))
    signed = any(pair.partition("=")[0].lower() in _SECRET_PARAMETERS for pair in urlsplit(uri).query.split("&"))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "" if signed else parts.query, ""))


def redact_text(text: str, uri: str) -> str:
    """`text` (an error message) without the credentials that `uri` carries."""
    parts = urlsplit(uri)
    secrets = [parts.password, parts.username]
    secrets += [value for name, _, value in (p.partition("=") for p in parts.query.split("&"))
                if name.lower() in _SECRET_PARAMETERS]
    for secret in filter(None, secrets):
        text = text.replace(secret, "REDACTED")
    return text
