#!/usr/bin/env bash
# The prepared GPU check, as one script for an H100/H200 (about 8 minutes): the GPU tests, then
# bench.engine at the Llama-2-7B and Llama-3.2-1B shapes in bfloat16, with and without CUDA graphs,
# batch 1..128, top-p 0.95, mixed alphas: ms/step, tokens/s, fraction of the weight-streaming
# floor, host syncs per step. Results land in $OUT (default bench/results), named after the card.
#   usage: bench/gpu.sh            PY=python3 OUT=$OUT bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-$card.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu-$card.txt"

"$PY" -m pytest -q -m gpu -rs tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests-$card.txt"

# With CUDA graphs (the default) and without, alternating in one process: the speed-up per batch.
for shape in llama-7b llama-1b; do
    "$PY" -m bench.engine --shape "$shape" --device cuda --dtype bfloat16 \
        --batch-sizes 1,8,32,64,128 --new-tokens 32 --prompt-len 32 --graphs-ab --rounds 2 \
        --output "$OUT/engine-$shape-$card.json" | tee "$OUT/engine-$shape-$card.md"
done
