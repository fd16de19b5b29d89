#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (about 10 minutes on an H100/H200): the GPU-only tests, the
# transformer benchmark (SD3.5 Large and Medium shapes, random weights: BF16 eager/compiled vs every FP8
# backend, with memory and error) and the end-to-end batch throughput, BF16 next to FP8.
# Usage: bash scripts/gpu-check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt"
for model in large medium; do
    python app.py bench --model "$model" --repeats 5 --json "$out/bench-$model.json" 2>&1 | tee "$out/bench-$model.txt"
done
python app.py bench --e2e --rows 8 --json "$out/e2e.json" 2>&1 | tee "$out/e2e.txt"
