"""Evidence for two engine/scheduler changes, measured on the engine alone (no HTTP).

    python bench/results/profiles/kv_capacity_experiment.py 64 16-128 12

A closed loop keeps CLIENTS rows running on the toy pair (a finished row is replaced by a new
one, max_new_tokens drawn from LOW-HIGH) and compares, side by side:
- KV row operations as in batchserve/batch.py, vs monkeypatched ones that keep the growable
  buffer's spare capacity (today every select_rows/concat hands the layer a tensor with no
  headroom, so the next decode append copies the whole cache into a new 2x buffer);
- admitting waiting rows at every step, vs coalescing them (>= 8 rows or 16 steps).
The monkeypatches are a sketch for the engine's owner, not production code.
"""

from __future__ import annotations

import random
import sys
import time

import torch

from batchserve import batch as kv
from batchserve.engine import EngineRow, LDAEngine, SamplingParams
from batchserve.models import load_pair

ORIGINAL = (kv.DynamicKVCache.select_rows, kv.DynamicKVCache.concat)


def select_rows_keeping_capacity(self: kv.DynamicKVCache, index: torch.Tensor) -> None:
    for layer in self._layers():
        for spare in (layer._k, layer._v):
            spare.buffer = spare.buffer[:, :, spare.start :].index_select(0, index)
            spare.end -= spare.start
            spare.start = 0


def concat_keeping_capacity(
    self: kv.DynamicKVCache, other: kv.DynamicKVCache, pad_self: int, pad_other: int
) -> None:
    for mine, theirs in zip(self._layers(), other._layers(), strict=True):
        for a, b in ((mine._k, theirs._k), (mine._v, theirs._v)):
            va, vb = a.view(), b.view()
            rows, heads, length, dim = va.shape
            common = length + pad_self
            buffer = va.new_empty(rows + vb.shape[0], heads, max(2 * common, common + 16), dim)
            buffer[:rows, :, :pad_self] = 0
            buffer[:rows, :, pad_self:common] = va
            buffer[rows:, :, :pad_other] = 0
            buffer[rows:, :, pad_other:common] = vb
            a.buffer, a.start, a.end = buffer, 0, common


def closed_loop(
    engine: LDAEngine,
    clients: int,
    lengths: tuple[int, int],
    seconds: float,
    min_rows: int,
    max_wait_steps: int,
) -> tuple[float, float, int, int]:
    """(tokens/s, ms/step, admissions, steps) with CLIENTS rows kept in flight."""
    rng = random.Random(0)
    next_id = 0

    def new_row() -> EngineRow:
        nonlocal next_id
        next_id += 1
        ids = tuple(rng.randrange(4, 1000) for _ in range(rng.randint(8, 30)))
        params = SamplingParams(max_new_tokens=rng.randint(*lengths), ignore_eos=True)
        return EngineRow(next_id, ids, params, next_id)

    waiting = [new_row() for _ in range(clients)]
    tokens = steps = admissions = waited = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        finished = []
        ready = len(waiting) >= min_rows or waited >= max_wait_steps or not engine.num_running
        if waiting and ready:
            finished += engine.admit(waiting)
            admissions += 1
            waiting, waited = [], 0
        elif waiting:
            waited += 1
        finished += engine.step()
        steps += 1
        for row in finished:
            tokens += len(row.token_ids)
            waiting.append(new_row())
    elapsed = time.perf_counter() - started
    return tokens / elapsed, elapsed / steps * 1e3, admissions, steps


def main() -> None:
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    low, _, high = (sys.argv[2] if len(sys.argv) > 2 else "16-128").partition("-")
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 12.0
    torch.set_num_threads(1)
    pair = load_pair("toy")
    for _ in range(2):  # two rounds: the spread between them is the machine's noise
        for patched in (False, True):
            kv.DynamicKVCache.select_rows, kv.DynamicKVCache.concat = (
                (select_rows_keeping_capacity, concat_keeping_capacity) if patched else ORIGINAL
            )
            for min_rows, max_wait in ((1, 0), (8, 16)):
                tps, ms, admissions, steps = closed_loop(
                    LDAEngine(pair), clients, (int(low), int(high)), seconds, min_rows, max_wait
                )
                print(
                    f"{clients} rows {low}-{high} | KV keeps capacity: {patched!s:5} | admit at "
                    f">= {min_rows} rows or {max_wait} steps | {tps:6.0f} tokens/s | "
                    f"{ms:5.1f} ms/step | {admissions} admissions / {steps} steps",
                    flush=True,
                )


if __name__ == "__main__":
    main()
