#!/usr/bin/env bash
# The wheels a lent GPU machine lacks (it has torch, transformers, peft, accelerate, safetensors and
# huggingface_hub; no diffusers, no pydantic), downloaded here for its Python (3.12, x86-64) into an ignored
# folder small enough to carry (≈ 9 MB). Versions: the ones this checkout runs with.
set -euo pipefail
cd "$(dirname "$0")"
version() { python3 -c "from importlib.metadata import version; print(version('$1'))"; }
rm -rf wheels && mkdir wheels
for name in diffusers importlib-metadata pydantic pydantic-core pydantic-settings annotated-types \
            typing-inspection python-dotenv; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels "$name==$(version "$name")"
done
du -sh wheels
