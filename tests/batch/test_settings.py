"""Operator settings: budgets and the input policy come from the environment, never from a manifest."""

import pytest

from imagic.engine.config import make_config
from imagic.batch.settings import Settings


def test_settings_come_from_the_environment(monkeypatch):
    assert Settings.from_env().allowed_inputs is None  # local mode: the user's own machine
    assert Settings.from_env("deployment").allowed_inputs == ["s3://"]  # a worker: s3:// only by default
    monkeypatch.setenv("IMAGIC_ALLOWED_INPUTS", "s3://datasets/, https://images.example.com/")
    monkeypatch.setenv("IMAGIC_MAX_STEPS", "100")
    settings = Settings.from_env("deployment")
    assert settings.allowed_inputs == ["s3://datasets/", "https://images.example.com/"] and settings.max_steps == 100


@pytest.mark.parametrize("uri, allowed", [
    ("s3://datasets/a.png", True), ("s3://other/a.png", False), ("https://images.example.com/x.png", True),
    ("https://images.example.com.evil.io/x.png", False), ("/etc/passwd", False), ("file:///etc/passwd", False),
    ("http://169.254.169.254/latest/meta-data/", False),
])
def test_the_input_policy(uri, allowed):
    settings = Settings(allowed_inputs=["s3://datasets/", "https://images.example.com/"])
    assert settings.input_allowed(uri) is allowed
    assert Settings(allowed_inputs=["file:"]).input_allowed("/data/a.png")
    assert Settings().input_allowed(uri)


def test_budgets_name_the_setting_that_allows_more():
    settings = Settings(max_steps=100, max_images=4)
    config = make_config("fast", embedding_steps=10**9, render_batch_size=10**6)
    problems = settings.budget_problems(config, etas=[1.0] * 5, seeds=[0])
    assert problems == [
        "embedding_steps: 1000000000 is over the limit of 100 (operator setting IMAGIC_MAX_STEPS)",
        "finetune_steps: 300 is over the limit of 100 (operator setting IMAGIC_MAX_STEPS)",
        "render_batch_size: 1000000 is over the limit of 64 (operator setting IMAGIC_MAX_BATCH_SIZE)",
        "etas × seeds: 5 is over the limit of 4 (operator setting IMAGIC_MAX_IMAGES)",
    ]
    assert not Settings().budget_problems(make_config("paper"), etas=[1.0], seeds=[0])


def test_a_manifest_from_a_bucket_or_a_server_reads_only_from_there():
    local = Settings.defaults()
    assert local.bounded_by("manifest.jsonl") is local and local.input_allowed("/etc/passwd")
    from_bucket = local.bounded_by("s3://shared/manifest.jsonl")
    assert from_bucket.input_allowed("s3://other/a.png")
    assert not from_bucket.input_allowed("/home/me/a.png") and not from_bucket.input_allowed("http://10.0.0.1/x")
    from_web = local.bounded_by("https://user:pw@data.example.com/m.jsonl?sig=1")
    assert from_web.allowed_inputs == ["https://data.example.com/"]
    assert from_web.input_allowed("https://data.example.com/a.png") and not from_web.input_allowed("http://169.254.169.254/")
    chosen = local.model_copy(update={"allowed_inputs": ["file:"]})
    assert chosen.bounded_by("s3://shared/manifest.jsonl") is chosen  # the operator's choice wins
