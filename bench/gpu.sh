#!/usr/bin/env bash
# The prepared GPU check, as one script for an H100/H200 (never run yet; sized for ~11 minutes): the GPU tests, then
# bench.engine at the Llama-2-7B and Llama-3.2-1B shapes in bfloat16, with and without CUDA graphs,
# batch 1..128, top-p 0.95, mixed alphas: ms/step, tokens/s, fraction of the weight-streaming
# floor, host syncs per step; then, where the serving packages import, bench.load over HTTP at
# the 1B shape (serial, static, continuous; 1 and 64 clients; 16-128 new tokens). Results land in
# $OUT (default bench/results), named after the card. STAGES picks stages (default: all).
#   usage: bench/gpu.sh            PY=python3 OUT=$OUT STAGES="tests engine http" bench/gpu.sh
# The GPU image lacks starlette, uvicorn and pydantic: run ../shared/gpu/wheels.sh here first and
# carry .whl; this script installs them into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
STAGES=${STAGES:-tests engine http}
mkdir -p "$OUT"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-$card.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu-$card.txt"

if [[ -d .whl ]] && ! "$PY" -c "import starlette, uvicorn, pydantic" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [[ " $STAGES " == *" tests "* ]]; then
    "$PY" -m pytest -q -m gpu -rs tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests-$card.txt"
fi

# With CUDA graphs (the default) and without, alternating in one process: the speed-up per batch.
if [[ " $STAGES " == *" engine "* ]]; then
    for shape in llama-7b llama-1b; do
        "$PY" -m bench.engine --shape "$shape" --device cuda --dtype bfloat16 \
            --batch-sizes 1,8,32,64,128 --new-tokens 32 --prompt-len 32 --graphs-ab --rounds 2 \
            --output "$OUT/engine-$shape-$card.json" | tee "$OUT/engine-$shape-$card.md"
    done
fi

# Issue 20's HTTP targets at the 1B shape: continuous >= 20x serial and >= 5,000 tokens/s at 64
# clients, >= 1.5x static on mixed lengths.
if [[ " $STAGES " == *" http "* ]]; then
    if "$PY" -c "import starlette, uvicorn, pydantic" 2>/dev/null; then
        "$PY" -m bench.load --shape llama-1b --modes serial,static,continuous --concurrency 1,64 \
            --max-new-tokens 16-128 --duration 20 \
            --output "$OUT/load-llama-1b-$card.json" 2>&1 | tee "$OUT/load-llama-1b-$card.log"
    else
        echo "http stage skipped: starlette, uvicorn or pydantic missing (carry .whl)" | tee -a "$OUT/gpu-$card.txt"
    fi
fi
