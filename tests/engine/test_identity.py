"""Which weights a model is: the content hash written to every record."""

import shutil

from imagic.engine.identity import known_model_sha256, model_sha256
from imagic.io.models import local_model


def test_hash_changes_with_the_weights(tiny_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert model_sha256(str(copy)) == model_sha256(str(tiny_dir))
    weights = next(copy.glob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    model_sha256.cache_clear()
    assert model_sha256(str(copy)) != model_sha256(str(tiny_dir))
    assert model_sha256("not/a/model") is None and local_model("toy") == "toy"


def test_a_known_hash_needs_no_download(tiny_dir):
    assert known_model_sha256(str(tiny_dir)) == model_sha256(str(tiny_dir))
    assert known_model_sha256("s3://bucket/models/sd15/") is None  # an s3:// prefix is immutable by convention
    assert known_model_sha256("no-such-org/no-such-model") is None
    assert known_model_sha256("toy") is not None
