"""Credentials out of URIs and messages."""

import pytest

from imagic.io.redaction import redact_text, redact_uri


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
    assert redact_uri(uri) == shown


def test_secrets_a_uri_carries_are_removed_from_a_message():
    uri = "https://user:hunter2@host.example/a.png?X-Amz-Signature=deadbeef&size=2"
    message = "GET https://user:hunter2@host.example/a.png?X-Amz-Signature=deadbeef failed for user"
    assert redact_text(message, uri) == "GET https://REDACTED:REDACTED@host.example/a.png?X-Amz-Signature=REDACTED failed for REDACTED"
    assert redact_text("nothing secret", "/data/a.png") == "nothing secret"
