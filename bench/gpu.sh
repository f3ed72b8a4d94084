#!/usr/bin/env bash
# The GPU check of issue 6, as one script for an H100/H200-class machine (a few minutes):
#  1. bench.engine on a random-init Llama-2-7B-shaped pair in bfloat16, batch 1..128, with the
#     memory-bandwidth floor per step;
#  2. a short bench.load (serial vs continuous) against a server on a 7B-shaped pair.
# Results land in $OUT (default bench/results), named after the card.
#   usage: bench/gpu.sh            PY=python OUT=/tmp/out bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-$card.txt"

"$PY" -m bench.engine --shape llama-7b --device cuda --dtype bfloat16 \
    --batch-sizes 1,8,32,64,128 --new-tokens 32 --prompt-len 32 \
    --output "$OUT/engine-llama-7b-$card.json" | tee "$OUT/engine-llama-7b-$card.md"

# The pair is written in bfloat16 from the GPU (2 x 13.5 GB) and loaded back by both servers on
# the one card (2 x 27 GB of weights + KV caches for 64 rows: fits an 80 GB H100).
"$PY" -m bench.load --shape llama-7b --modes serial,continuous --concurrency 1,64 \
    --mix 0 --max-new-tokens 128 --duration 30 --max-batch-size 64 \
    --output "$OUT/load-llama-7b-$card.json"
