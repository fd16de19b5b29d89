#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of about 9 minutes on an H100/H200, most important first:
# the transformer benchmark on SD3.5 Large shapes (random weights: BF16 eager/compiled vs every FP8 backend,
# scaled_mm with and without fused q/k/v projections, with memory and error), the end-to-end batch
# throughput (BF16 next to FP8, 1024², 28 steps, the production settings: blocks compiled, warm-up at the
# GPU batch size), the GPU-only tests, the PNG writer on this host's CPU (what the e2e run's CPU-side share
# is mostly made of), then the Medium-shaped benchmark. Each step has its own time limit so one slow step
# cannot take the others' results with it.
# Usage: bash scripts/gpu-check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-$(command -v python3 || command -v python)}"
log="$out/log.txt"

step() {  # step SECONDS NAME COMMAND...
    local limit="$1" name="$2"
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$log"
    local began=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - began))s" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
"$py" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$log"

step "${LIMIT_LARGE:-160}" "bench large" "$py" app.py bench --model large --repeats 5 --json "$out/bench-large.json"
step "${LIMIT_E2E:-170}" "bench --e2e" "$py" app.py bench --e2e --rows 8 --size 1024 --steps 28 \
    --json "$out/e2e.json"
step "${LIMIT_TESTS:-130}" "GPU tests" "$py" -m pytest tests/test_gpu.py -q -rs -s -p no:cacheprovider
step "${LIMIT_PNG:-30}" "bench --png (this host's CPU)" "$py" app.py bench --png --repeats 5 --json "$out/png.json"
step "${LIMIT_MEDIUM:-90}" "bench medium" "$py" app.py bench --model medium --repeats 5 --json "$out/bench-medium.json"
# Optional (AUTOTUNE=1, about 5 more minutes): the same comparison with Inductor's tuned kernels, BF16 and FP8
# both compiled in max-autotune-no-cudagraphs mode.
if [ "${AUTOTUNE:-0}" = 1 ]; then
    step "${LIMIT_AUTOTUNE:-300}" "bench large, max-autotune" env SD35_COMPILE_MODE=max-autotune-no-cudagraphs \
        "$py" app.py bench --model large --quick --repeats 5 --json "$out/bench-large-autotune.json"
fi
