"""Models from an s3:// prefix (synced once to the cache) and the content hash written to records."""

import boto3
import pytest
import torch

from imagic import load_pipeline
from imagic.engine.identity import model_sha256
from imagic.io.models import SYNC_MARKER, local_model
from imagic.io.storage import StorageError


def upload(directory, bucket, prefix):
    s3 = boto3.client("s3")
    for path in directory.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")


def test_s3_model_is_synced_once_and_loads(s3_env, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGIC_CACHE", str(tmp_path / "cache"))
    upload(tiny_dir, s3_env, "models/tiny/v1")
    directory = local_model(f"s3://{s3_env}/models/tiny/v1/")
    assert directory.startswith(str(tmp_path / "cache")) and (tmp_path / "cache").joinpath(
        "models", "s3", s3_env, "models/tiny/v1", SYNC_MARKER).is_file()
    # load_pipeline resolves s3:// itself (one place for model resolution, every command and flow).
    synced = load_pipeline(f"s3://{s3_env}/models/tiny/v1/").unet.state_dict()
    original = load_pipeline(str(tiny_dir)).unet.state_dict()
    assert synced.keys() == original.keys() and all(torch.equal(synced[k], original[k]) for k in synced)
    assert model_sha256(directory) == model_sha256(str(tiny_dir))

    boto3.client("s3").delete_object(Bucket=s3_env, Key="models/tiny/v1/model_index.json")
    assert local_model(f"s3://{s3_env}/models/tiny/v1/") == directory  # cached: no second download


def test_empty_prefix_is_a_clear_error(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGIC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(StorageError, match="no objects under this prefix"):
        local_model(f"s3://{s3_env}/models/nothing/")
