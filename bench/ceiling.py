"""What batching can gain on this host, with no HTTP: the engine alone in a closed loop.

    python -m bench.ceiling                       # toy pair, 1 vs 32 rows in flight, 2 rounds
    python -m bench.ceiling --levels 1,8,32 --rounds 4 --duration-s 15

`bench.load` measures continuous / serial through real servers (issue 20's target: >= 12x at
32 clients). This measures the same ratio one layer down, where nothing but the engine runs:
one EngineCore (the server's default scheduler and runner), N requests in flight, each a
finished request replaced at once by the next, as 32 closed-loop clients do to a continuous
server; N = 1 is what a serial server runs. The requests are bench.load's own (same seed, same
words, the server's prompt format, 64 new tokens, ignore_eos), so each step carries the
newcomers' prompt tokens beside the decoding rows, as a served step does. Levels alternate
round by round (every other round in reverse order) on one core, so the host's drift favours
none.

It also fits the step time to `fixed + per_token x tokens in the step` through the levels'
means, and prints the fixed cost a step would need for the top level to reach `--target`
times the first level's tokens/s at that per-token cost: the ratio between a full batch and a
lone row grows with the fixed cost every step pays, so a faster lone row lowers it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from prometheus_client import generate_latest

from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import EngineRow, RunnerConfig, SamplingParams
from batchserve.engine import EngineCore, build_engine_core
from batchserve.frontend import Frontend
from batchserve.worker.models import ModelPair, load_pair
from bench.load import IntRange, Mix, Workload, host_description
from bench.report import (
    add_output_option,
    bench_parser,
    command_line,
    parse_prometheus,
    ratio,
    round_order,
    table,
    write_report,
)


@dataclass(frozen=True)
class LevelRun:
    level: int
    round: int
    tokens_per_s: float
    step_ms: float
    tokens_per_step: float  # prompt tokens and decoding rows the step's forward carried
    drawn_per_step: float  # tokens generated per step: the rows that drew one
    steps: int


class ClosedLoop:
    """bench.load's request sequence, fed to one engine core at a fixed number in flight."""

    def __init__(self, pair: ModelPair, workload: Workload, core: EngineCore) -> None:
        self.workload, self.core = workload, core
        # The server's own formatting and tokenizing, so the prompts are the served ones.
        self.frontend = Frontend(pair.tokenizer, max_row_tokens=core.runner.max_row_tokens)
        self.next_index = 0

    def _add_next(self) -> None:
        spec = self.workload.request(self.next_index)
        body = spec.body
        ids = self.frontend.encode(self.frontend.format(body["prompt"]))
        params = SamplingParams(
            alpha=body["alpha"], temperature=body["temperature"], top_p=body["top_p"],
            max_new_tokens=body["max_new_tokens"], ignore_eos=body["ignore_eos"],
        )  # fmt: skip
        row = EngineRow(self.next_index, tuple(ids), params, body["seed"])
        self.core.add_request(self.next_index, [row], now=0.0)
        self.next_index += 1

    def _counters(self) -> tuple[float, float]:
        metrics = parse_prometheus(generate_latest(self.core.metrics.registry).decode())
        return metrics["batchserve_engine_steps_total"], metrics["batchserve_step_tokens_sum"]

    def run(self, level: int, duration_s: float, round_index: int) -> LevelRun:
        """`level` requests in flight for `duration_s` (after one warm-up request each)."""
        open_ids: set[int] = set()

        def top_up() -> None:
            while len(open_ids) < level:
                open_ids.add(self.next_index)
                self._add_next()

        def step() -> int:
            result = self.core.step(now=0.0)
            tokens = 0
            for event in result.events:
                for update in event.updates:
                    tokens += len(update.token_ids)
                    if update.finish_reason is not None:
                        open_ids.discard(update.request_id)
            top_up()
            return tokens

        top_up()
        warm_until = self.next_index + level  # the first generation of requests warms up
        while self.next_index < warm_until:
            step()
        steps, step_tokens = self._counters()
        tokens = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < duration_s:
            tokens += step()
        steps_after, step_tokens_after = self._counters()
        for request_id in open_ids:
            self.core.abort_request(request_id)
        num_steps = int(steps_after - steps)
        return LevelRun(
            level=level,
            round=round_index,
            tokens_per_s=tokens / elapsed,
            step_ms=elapsed / max(1, num_steps) * 1e3,
            tokens_per_step=(step_tokens_after - step_tokens) / max(1, num_steps),
            drawn_per_step=tokens / max(1, num_steps),
            steps=num_steps,
        )


def fit_step_cost(runs: list[LevelRun]) -> tuple[float, float]:
    """Least squares of the levels' mean step ms on their mean tokens per step:
    (fixed ms, ms per token)."""
    points = mean_by_level(runs)
    xs = [p.tokens_per_step for p in points.values()]
    ys = [p.step_ms for p in points.values()]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("every level carried the same tokens per step: no cost per token to fit")
    per_token = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return mean_y - per_token * mean_x, per_token


def mean_by_level(runs: list[LevelRun]) -> dict[int, LevelRun]:
    """Each level's means over its rounds (round = -1)."""
    means = {}
    for level in sorted({r.level for r in runs}):
        mine = [r for r in runs if r.level == level]
        means[level] = LevelRun(
            level=level,
            round=-1,
            tokens_per_s=statistics.fmean(r.tokens_per_s for r in mine),
            step_ms=statistics.fmean(r.step_ms for r in mine),
            tokens_per_step=statistics.fmean(r.tokens_per_step for r in mine),
            drawn_per_step=statistics.fmean(r.drawn_per_step for r in mine),
            steps=sum(r.steps for r in mine),
        )
    return means


def fixed_cost_for(target: float, low: LevelRun, high: LevelRun, per_token: float) -> float | None:
    """The fixed ms per step at which `high` makes `target` x `low`'s tokens/s, each step
    costing fixed + per_token x its tokens (tokens per step and tokens drawn per step as
    measured); None where no fixed cost can (`high` draws under `target` x `low`'s tokens
    per step, the most the ratio can reach)."""
    drawn_low, drawn_high = low.drawn_per_step, high.drawn_per_step
    if drawn_high <= target * drawn_low:
        return None
    work_low, work_high = per_token * low.tokens_per_step, per_token * high.tokens_per_step
    # drawn_high / (f + work_high) = target * drawn_low / (f + work_low), solved for f
    return (target * drawn_low * work_high - drawn_high * work_low) / (
        drawn_high - target * drawn_low
    )


def per_token_cost_for(target: float, low: LevelRun, high: LevelRun, fixed: float) -> float | None:
    """The cost per token (ms) at or under which `high` makes `target` x `low`'s tokens/s at
    this fixed cost per step; None where no cost per token can (as in `fixed_cost_for`)."""
    drawn_low, drawn_high = low.drawn_per_step, high.drawn_per_step
    if drawn_high <= target * drawn_low or fixed <= 0:
        return None
    # drawn_high / (fixed + c t_high) = target * drawn_low / (fixed + c t_low), solved for c
    return (fixed * (target * drawn_low - drawn_high)) / (
        drawn_high * low.tokens_per_step - target * drawn_low * high.tokens_per_step
    )


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("ceiling", __doc__.split("\n\n")[0])
    parser.add_argument("--after", default="toy", help="after model (default: the toy pair)")
    parser.add_argument("--before", default=None, help="before model (optional with toy)")
    parser.add_argument("--levels", default="1,32", help="requests in flight (1,32)")
    parser.add_argument(
        "--duration-s", type=float, default=10.0, help="seconds per level and round (10)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations (2)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per request (64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as served)")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile the step (default: the runner's own choice)",
    )  # fmt: skip
    parser.add_argument(
        "--target", type=float, default=12.0,
        help="the ratio to solve the fixed cost for (issue 20's continuous / serial: 12)",
    )  # fmt: skip
    add_output_option(parser, "ceiling-toy-cpu.json")
    args = parser.parse_args(argv)
    try:
        levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--levels must be comma-separated counts, not {args.levels!r}")
    if not levels or levels[0] < 1 or len(levels) < 2:
        parser.error("--levels needs two or more positive counts")
    if args.rounds < 1 or args.duration_s <= 0:
        parser.error("--rounds must be >= 1 and --duration-s > 0")
    if args.target <= 1:
        parser.error("--target must be > 1: a ratio of the top level over the first")
    torch.set_num_threads(args.threads)
    pair = load_pair(args.after, args.before, device="cpu", dtype="float32")
    core = build_engine_core(
        pair,
        RunnerConfig(compile=args.compile),
        SchedulerConfig(max_batch_size=max(64, levels[-1])),
    )
    workload = Workload(
        name=f"single-{args.max_new_tokens}", concurrency=tuple(levels),
        max_new_tokens=IntRange(args.max_new_tokens, args.max_new_tokens),
        mix=Mix(0.0, IntRange(1, 1)),
    )  # fmt: skip
    loop = ClosedLoop(pair, workload, core)
    runs: list[LevelRun] = []
    for round_index in range(args.rounds):
        for level in round_order(levels, round_index):
            run = loop.run(level, args.duration_s, round_index)
            print(f"round {round_index + 1} of {args.rounds}, {level} in flight: "
                  f"{run.tokens_per_s:,.0f} tokens/s, {run.step_ms:.2f} ms a step of "
                  f"{run.tokens_per_step:.1f} tokens", file=sys.stderr)  # fmt: skip
            runs.append(run)
    means = mean_by_level(runs)
    fixed, per_token = fit_step_cost(runs)
    low, high = means[levels[0]], means[levels[-1]]
    measured = ratio(high.tokens_per_s, low.tokens_per_s)
    needed = fixed_cost_for(args.target, low, high, per_token)
    per_token_needed = per_token_cost_for(args.target, low, high, fixed)
    rows = [
        [str(m.level), f"{m.tokens_per_s:,.0f}", f"{m.step_ms:.2f}", f"{m.tokens_per_step:.1f}",
         f"{ratio(m.tokens_per_s, low.tokens_per_s):.2f}x"]
        for m in means.values()
    ]  # fmt: skip
    header = ["in flight", "tokens/s", "step ms", "tokens per step", f"over {levels[0]}"]
    command = command_line("ceiling", argv)
    goal = f"{levels[-1]} in flight would make {args.target:g}x {levels[0]}'s tokens/s"
    if needed is None:
        needed_text = f"{goal} at no fixed cost: it draws too few tokens a step"
    elif needed <= 0:
        needed_text = f"{goal} at any fixed cost"
    else:
        needed_text = (
            f"{goal} only if every step paid a fixed cost of at least **{needed:.2f} ms**"
            + (f" ({needed / fixed:.1f}x the fixed cost measured)" if fixed > 0 else "")
        )
        if per_token_needed is not None and per_token_needed > 0:
            needed_text += (
                f"; or, at the fixed cost measured, with a cost per token of at most "
                f"**{per_token_needed * 1e3:.0f} us** ({per_token * 1e3:.0f} now)"
            )
    text = (
        f"# Batching ceiling: the engine alone, closed loop ({time.strftime('%Y-%m-%d %H:%M:%S %z')})"
        f"\n\n- host: {host_description()}; pair: {pair.after_id}; torch threads {args.threads}; "
        f"compiled: {core.runner.info()['compiled']}\n"
        f"- requests: bench.load's single-{args.max_new_tokens} workload (alpaca prompts, "
        f"{args.max_new_tokens} new tokens, ignore_eos); {args.rounds} round(s) of "
        f"{args.duration_s:g} s per level, every other round in reverse order; means below\n"
        f"- command: `{command}`\n\n"
        + table(header, rows)
        + f"\n\n{levels[-1]} in flight over {levels[0]}: **{measured:.2f}x**, with no HTTP "
        f"(bench.load's continuous / serial at {levels[-1]} clients reads about as much: a "
        "serial server's per-request overhead can lift it a little above)."
        f"\n\nStep time fit: {fixed:.2f} ms fixed + {per_token * 1e3:.0f} us per token the "
        f"step carries. At that per-token cost, {needed_text}.\n"
    )
    print(text)
    report = {
        "benchmark": "ceiling",
        "command": command,
        "pair": pair.after_id,
        "threads": args.threads,
        "levels": levels,
        "runs": [r.__dict__ for r in runs],
        "means": {str(k): v.__dict__ for k, v in means.items()},
        "ratio": measured,
        "fixed_ms": fixed,
        "per_token_ms": per_token,
        "target": args.target,
        "fixed_ms_for_target": needed,
        "per_token_ms_for_target": per_token_needed,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_report(args.output, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
