"""`logprobs` and `score_alphas` on the LDA routes: validated, returned only when asked."""

from __future__ import annotations

import httpx
import pytest
from servers import client_of

from batchserve.api.app import ServerConfig, create_app
from batchserve.worker.models import ModelPair


async def _post(pair: ModelPair, route: str, body: dict | str) -> httpx.Response:
    async with client_of(create_app(ServerConfig(), pair=pair)) as c:
        if isinstance(body, str):  # raw JSON, for values json.dumps refuses (1e999)
            return await c.post(route, content=body, headers={"content-type": "application/json"})
        return await c.post(route, json=body)


async def test_batch_rows_carry_logprobs_when_asked(llama_pair: ModelPair) -> None:
    body = {
        "prompts": ["hello", "the cat"],
        "n": 2,
        "max_new_tokens": 6,
        "seed": 3,
        "temperature": 1.0,
        "top_p": 1.0,
        "alpha": 1.0,
        "ignore_eos": True,
        "logprobs": True,
        "score_alphas": [0, 1.0, 2.5],
    }
    resp = await _post(llama_pair, "/generate_lda_batch", body)
    assert resp.status_code == 200, resp.text
    for row in resp.json()["results"]:
        lp = row["logprobs"]
        assert len(lp["token_ids"]) == len(lp["after"]) == len(lp["sampled"]) == 6
        assert lp["score_alphas"] == [0.0, 1.0, 2.5]
        assert lp["sum_after"] == pytest.approx(sum(lp["after"]))
        # Untruncated at temperature 1: the row's own alpha scores what it sampled.
        assert lp["sum_score_alphas"][1] == pytest.approx(lp["sum_sampled"], abs=1e-4)
        assert lp["sum_score_alphas"][0] == pytest.approx(lp["sum_after"], abs=1e-4)


async def test_no_logprobs_field_unless_asked(llama_pair: ModelPair) -> None:
    resp = await _post(llama_pair, "/generate_lda", {"prompt": "hi", "max_new_tokens": 3})
    assert resp.status_code == 200 and "logprobs" not in resp.json()


@pytest.mark.parametrize("score_alphas", ["[1e999]", '["x"]', "[5000.0]", str(list(range(17)))])
async def test_bad_score_alphas_are_refused(llama_pair: ModelPair, score_alphas: str) -> None:
    body = '{"prompt": "hi", "max_new_tokens": 3, "score_alphas": ' + score_alphas + "}"
    resp = await _post(llama_pair, "/generate_lda", body)
    assert resp.status_code == 422, resp.text
    assert "score_alphas" in resp.text
