"""Bytes in and out: the output store (local folders, S3-compatible), bounded input reads (file, s3://,
http(s)://), s3:// model sync, and the redaction that keeps credentials out of everything written."""
