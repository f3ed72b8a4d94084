"""Numbers into tables, markdown and plots for the load benchmark; no HTTP and no models here."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (enough for counters and histogram sums)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


RESULTS_DIR = Path(__file__).parent / "results"


def results_path(path: Path) -> Path:
    """`path`, where a bare file name means that name in bench/results/."""
    return RESULTS_DIR / path if path.parent == Path() else path


def bench_parser(name: str, description: str | None, **options: Any) -> argparse.ArgumentParser:
    """The parser of `python -m bench.<name>`, the command `command_line` writes in reports."""
    return argparse.ArgumentParser(
        prog=f"python -m bench.{name}", description=description, **options
    )


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command a report states it was made by: `python -m bench.<name>` and its arguments
    (`argv`, or this process's own when None), quoted so it can be pasted back."""
    return f"python -m bench.{name} " + shlex.join(sys.argv[1:] if argv is None else argv)


def add_output_option(parser: argparse.ArgumentParser, default_name: str) -> None:
    """`--output`: where the report's JSON goes (the markdown goes beside it); by default the
    benchmark's one current report in bench/results/."""
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR / default_name,
        help="JSON report; the markdown goes beside it (default: %(default)s)",
    )


def write_report(path: Path, report: dict[str, Any], markdown: str) -> None:
    """A benchmark's current report, over the last one (git keeps the earlier ones): its raw
    numbers as JSON at `path` and its markdown beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)
    print(f"wrote {path} and its .md", file=sys.stderr)


def round_order(items: Sequence[T], round_index: int) -> list[T]:
    """`items` in the order round `round_index` runs them: every other round in reverse, so a
    host's drift over minutes favours none of them."""
    return list(items[::-1] if round_index % 2 else items)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def table(
    header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str] | None = None
) -> str:
    """A markdown table; `align` gives each column's rule (`---:` right, the default)."""
    rules = align or ["---:"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rules) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def fmt(value: Any, spec: str = ",.1f") -> str:
    """A number for a table cell; "-" for a value that was not measured."""
    if value is None:
        return "-"
    return format(value, spec)


RUN_COLUMNS: list[tuple[str, str, str]] = [
    # (header, key, format)
    ("tokens/s", "tokens_per_s", ",.1f"),
    ("req/s", "requests_per_s", ",.2f"),
    ("lat p50 s", "latency_p50_s", ".3f"),
    ("lat p95 s", "latency_p95_s", ".3f"),
    ("lat p99 s", "latency_p99_s", ".3f"),
    ("qwait p50 ms", "queue_wait_p50_ms", ",.1f"),
    ("qwait p95 ms", "queue_wait_p95_ms", ",.1f"),
    ("mean batch", "mean_batch_size", ".1f"),
    ("requests", "num_requests", "d"),
    ("unfinished", "num_unfinished", "d"),
    ("errors", "num_errors", "d"),
]


def runs_table(runs: list[dict]) -> str:
    header = ["clients", "mode"] + [h for h, _, _ in RUN_COLUMNS]
    rows = (
        [
            str(run["concurrency"]),
            run["mode"] + (f" (round {run['round'] + 1})" if run.get("round") else ""),
        ]
        + [fmt(run.get(key), spec) for _, key, spec in RUN_COLUMNS]
        for run in runs
    )
    return table(header, rows)


# What the ratios compare: with several rounds of a level, each mode's mean over them.
MEAN_FIELDS = ("tokens_per_s", "latency_p50_s", "latency_p95_s")


def mean_by_mode(runs: list[dict]) -> dict[tuple[str, int], dict[str, float | None]]:
    """(mode, clients) -> the mean of MEAN_FIELDS over that pair's runs (rounds)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["mode"], run["concurrency"]), []).append(run)
    means: dict[tuple[str, int], dict[str, float | None]] = {}
    for key, group in groups.items():
        means[key] = {}
        for name in MEAN_FIELDS:
            values = [r[name] for r in group if r.get(name) is not None]
            means[key][name] = sum(values) / len(values) if values else None
    return means


def ratios(runs: list[dict]) -> list[dict]:
    """continuous / serial and continuous / static, per concurrency level, where both ran."""
    by_key = mean_by_mode(runs)
    rows = []
    for level in sorted({r["concurrency"] for r in runs}):
        cont = by_key.get(("continuous", level))
        if cont is None:
            continue
        row: dict[str, Any] = {"concurrency": level}
        for other in ("serial", "static"):
            base = by_key.get((other, level))
            if base is None:
                continue
            for key in MEAN_FIELDS:
                row[f"{key}_vs_{other}"] = ratio(cont[key], base[key])
        if len(row) > 1:
            rows.append(row)
    return rows


def baseline_comparison(runs: list[dict], rev: str) -> dict[str, list[dict]]:
    """Per mode and level, this code over the baseline (tokens/s: > 1 is faster; latency:
    < 1 is faster); and the baseline's own continuous / static / serial ratios, to set
    beside this code's."""
    suffix = "@" + rev
    ours = mean_by_mode([r for r in runs if not r["mode"].endswith(suffix)])
    theirs = [
        r | {"mode": r["mode"].removesuffix(suffix)} for r in runs if r["mode"].endswith(suffix)
    ]
    rows = []
    for (mode, level), base in mean_by_mode(theirs).items():
        this = ours.get((mode, level))
        if this is None:
            continue
        rows.append(
            {
                "mode": mode,
                "concurrency": level,
                "tokens_per_s": this["tokens_per_s"],
                "baseline_tokens_per_s": base["tokens_per_s"],
                "tokens_per_s_vs_baseline": ratio(this["tokens_per_s"], base["tokens_per_s"]),
                "latency_p50_s_vs_baseline": ratio(this["latency_p50_s"], base["latency_p50_s"]),
            }
        )
    return {"vs_baseline": rows, "baseline_ratios": ratios(theirs)}


def ratios_table(rows: list[dict]) -> str:
    columns = [
        ("tokens/s cont/serial", "tokens_per_s_vs_serial"),
        ("tokens/s cont/static", "tokens_per_s_vs_static"),
        ("lat p50 cont/serial", "latency_p50_s_vs_serial"),
        ("lat p95 cont/serial", "latency_p95_s_vs_serial"),
        ("lat p50 cont/static", "latency_p50_s_vs_static"),
        ("lat p95 cont/static", "latency_p95_s_vs_static"),
    ]
    header = ["clients"] + [h for h, _ in columns]
    cells = (
        [str(row["concurrency"])] + [fmt(row.get(k), ".2f") for _, k in columns] for row in rows
    )
    return table(header, cells)


def baseline_table(rows: list[dict], rev: str) -> str:
    header = [
        "clients",
        "mode",
        "tokens/s",
        f"tokens/s at {rev}",
        "tokens/s this / base",
        "lat p50 this / base",
    ]
    cells = (
        [
            str(row["concurrency"]),
            row["mode"],
            fmt(row["tokens_per_s"]),
            fmt(row["baseline_tokens_per_s"]),
            fmt(row["tokens_per_s_vs_baseline"], ".2f"),
            fmt(row["latency_p50_s_vs_baseline"], ".2f"),
        ]
        for row in rows
    )
    return table(header, cells)


def targets_table(targets: list[dict]) -> str:
    rows = (
        [
            t["name"],
            fmt(t["value"], ".2f"),
            f"{t['op']} {t['threshold']:g}",
            "yes" if t["holds"] else ("no" if t["holds"] is False else "-"),
        ]
        for t in targets
    )
    return table(["target", "measured", "needed", "holds"], rows, ["---", "---:", "---:", ":---:"])


def describe_workload(w: dict) -> str:
    mix = w["mix"]
    batch = (
        f"{mix['batch_fraction']:.0%} batch requests of {mix['batch_size']} prompts"
        if mix["batch_fraction"]
        else "single-prompt requests only"
    )
    bound = (
        f"{w['requests_per_level']} requests per level"
        if w.get("requests_per_level")
        else f"{w['duration_s']:g} s per level"
    )
    return (
        f"max_new_tokens {w['max_new_tokens']}, {batch}, prompts of {w['prompt_words']} words, "
        f"ignore_eos={w['ignore_eos']}, seed {w['seed']}, {bound}"
    )


def markdown(report: dict) -> str:
    """The whole report as markdown: setup, then per workload the runs and the ratios."""
    setup = report["setup"]
    out = [
        f"# Load benchmark ({report['created_at']})",
        "",
        f"- pair: {setup['pair']}",
        f"- host: {setup['host']}",
        f"- server: {setup['server']}",
    ]
    if report.get("command"):
        out.append(f"- command: `{report['command']}`")
    out.append("")
    if report.get("targets"):
        out += ["## Targets (issue 6)", "", targets_table(report["targets"]), ""]
    for w in report["workloads"]:
        out += [f"## Workload `{w['name']}`", "", describe_workload(w), ""]
        out += [runs_table(w["runs"]), ""]
        if w["ratios"]:
            out += ["Ratios (continuous over the other mode, same clients):", ""]
            out += [ratios_table(w["ratios"]), ""]
        if w.get("vs_baseline"):
            rev = report["baseline"]
            out += [f"This code against `{rev}` (each mode's two servers run back to back):", ""]
            out += [baseline_table(w["vs_baseline"], rev), ""]
        if w.get("baseline_ratios"):
            out += [f"`{rev}`'s own ratios (continuous over the other mode, same clients):", ""]
            out += [ratios_table(w["baseline_ratios"]), ""]
    return "\n".join(out)


def plot(report: dict, stem: Path) -> list[Path]:
    """Per workload: throughput vs clients, and latency CDFs per level. Returns the PNG paths."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib: pip install -e '.[plots]' (make setup has it)"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for w in report["workloads"]:
        modes = list(dict.fromkeys(r["mode"] for r in w["runs"]))
        levels = sorted({r["concurrency"] for r in w["runs"]})
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in modes:
            runs = sorted(
                (r for r in w["runs"] if r["mode"] == mode), key=lambda r: r["concurrency"]
            )
            ax.plot(
                [r["concurrency"] for r in runs],
                [r["tokens_per_s"] for r in runs],
                marker="o",
                label=mode,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(f"throughput: {w['name']}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = stem.with_name(f"{stem.name}-{w['name']}-throughput.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

        fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.5), squeeze=False)
        for ax, level in zip(axes[0], levels, strict=True):
            for mode in modes:
                run = next(
                    (r for r in w["runs"] if r["mode"] == mode and r["concurrency"] == level), None
                )
                if not run or not run["latencies_s"]:
                    continue
                xs = sorted(run["latencies_s"])
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=mode)
            ax.set_xscale("log")
            ax.set_xlabel("latency s")
            ax.set_title(f"{level} clients")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("fraction of requests")
        axes[0][-1].legend()
        fig.suptitle(f"latency CDF: {w['name']}")
        path = stem.with_name(f"{stem.name}-{w['name']}-latency-cdf.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
