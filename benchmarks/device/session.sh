#!/usr/bin/env bash
# What the device tool runs on a lent GPU (README: On a lent GPU): the carried wheels installed aside, then
# the session, its JSON and log under $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  benchmarks/device/wheels/*.whl || exit
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/gpu.py --session --budget-s "${BUDGET_S:-480}" --json "$OUT/gpu_session.json" 2>&1 \
  | grep -v "requires torchvision" | tee "$OUT/gpu_session.log"
