"""Summarise a `py-spy record -f raw` profile of a server's worker thread by engine phase.

    py-spy record --idle --native -p PID -d 15 -r 100 -f raw -o prof.txt   # while bench.load runs
    python -m bench.pyspy_summary prof.txt

Only samples whose stack passes through the engine's worker loop count, so the event loop,
uvicorn and idle threads do not dilute the shares. A frame counts once per sample (inclusive).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from bench.report import bench_parser

WORKER_FRAME = "Engine._run"

# (label, substring of a frame); indented labels are parts of the phase above them.
PHASES: list[tuple[str, str]] = [
    ("plan: scheduler.schedule", "Scheduler.schedule"),
    ("execute: runner.execute", "ModelRunner.execute"),
    ("  pack the step's inputs (host)", "ModelRunner._pack"),
    ("  forward, both models", "ModelRunner._forward_eager"),
    ("    compiled code", "CompiledFxGraph"),
    ("    prefill attention (per chunk)", "prefill_attention"),
    ("  sampling and log-probabilities", "StepSampler.sample"),
    ("    top-k/top-p filter (full sort)", "sorted_keep_mask"),
    ("  the step's device-to-host copy", "ModelRunner._to_host"),
    ("update: scheduler.update", "Scheduler.update"),
    ("events to listeners", "Engine._notify"),
    ("OpenMP runtime (libgomp: fork/join, spin, barrier)", "libgomp"),
    ("waiting to re-take the GIL", "gil_scoped_release::~"),
]


def summarize(path: Path, worker_frame: str = WORKER_FRAME) -> tuple[int, Counter]:
    shares: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if worker_frame not in stack or not count.isdigit():
            continue
        total += int(count)
        for label, needle in PHASES:
            if needle in stack:
                shares[label] += int(count)
    return total, shares


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("pyspy_summary", __doc__)
    parser.add_argument("profile", type=Path, help="py-spy raw (collapsed stacks) output")
    parser.add_argument("--worker-frame", default=WORKER_FRAME)
    args = parser.parse_args(argv)
    total, shares = summarize(args.profile, args.worker_frame)
    if not total:
        print(f"no samples through {args.worker_frame} in {args.profile}", file=sys.stderr)
        return 1
    print(f"{total} worker samples in {args.profile.name}")
    for label, _ in PHASES:
        print(f"{100 * shares[label] / total:5.1f}%  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
