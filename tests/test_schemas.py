"""One wire contract: the server answers exactly the fields of the models the client reads,
and the client builds its requests with the models the server validates."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import aconnect_sse
from pydantic import ValidationError
from test_app import serving

import batchserve_client.models
from batchserve import schemas
from batchserve.worker.models import ModelPair

ONLY_WHEN_ASKED = {"logprobs"}


def test_the_client_builds_requests_with_the_servers_own_models() -> None:
    assert batchserve_client.models.LDARequest is schemas.GenerateLDARequest
    assert batchserve_client.models.LDABatchRequest is schemas.GenerateLDABatchRequest
    assert batchserve_client.models.GenerateRequest is schemas.GenerateRequest
    assert batchserve_client.models.LDAResponse is schemas.LDAResponse


def fields(model: type) -> set[str]:
    return set(model.model_fields)


async def test_every_route_answers_exactly_the_contract_fields(llama_pair: ModelPair) -> None:
    async with serving(llama_pair) as http:
        http: httpx.AsyncClient
        one = (await http.post("/generate_lda", json={"prompt": "hi", "max_new_tokens": 3})).json()
        assert set(one) == fields(schemas.LDAResponse) - ONLY_WHEN_ASKED
        body = {"prompt": "hi", "max_new_tokens": 3, "logprobs": True}
        asked = (await http.post("/generate_lda", json=body)).json()
        assert set(asked) == fields(schemas.LDAResponse)
        assert set(asked["logprobs"]) <= fields(schemas.RowLogprobs)
        batch = (
            await http.post(
                "/generate_lda_batch", json={"prompts": ["a", "b"], "max_new_tokens": 2}
            )
        ).json()
        assert set(batch) == fields(schemas.LDABatchResponse)
        for row in batch["results"]:
            assert set(row) == fields(schemas.LDABatchResult) - ONLY_WHEN_ASKED
        plain = (await http.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})).json()
        assert set(plain) == fields(schemas.GenerateResponse)
        assert set(plain["model_1"]) == fields(schemas.ModelOutput)
        compat = (await http.get("/tokenizer_compatibility")).json()
        assert set(compat) == fields(schemas.TokenizerCompatibility)
        for parsed in (
            schemas.LDAResponse.model_validate(one),
            schemas.LDABatchResponse.model_validate(batch),
            schemas.GenerateResponse.model_validate(plain),
        ):
            assert not parsed.model_extra  # nothing the contract does not name
        assert (await http.get("/health")).json() == {"status": "ok"}
        for bad in (
            await http.post("/generate_lda", json={"prompt": ""}),
            await http.post("/generate_lda_batch", json={"prompts": ["a"], "n": 10**6}),
            await http.post(
                "/generate", content=b"{", headers={"content-type": "application/json"}
            ),
            await http.post(
                "/generate", json={"prompt": "x"}, headers={"content-type": "text/plain"}
            ),
        ):
            assert bad.status_code in (400, 415, 422) and set(bad.json()) == fields(
                schemas.ErrorResponse
            ), bad.text


async def test_stream_events_are_the_contract_models(llama_pair: ModelPair) -> None:
    async with serving(llama_pair) as http:
        body = {"prompt": "hi", "max_new_tokens": 4, "seed": 2, "stream": True}
        async with aconnect_sse(http, "POST", "/generate", json=body) as source:
            events = [(e.event, json.loads(e.data)) async for e in source.aiter_sse()]
        plain = (await http.post("/generate", json=body | {"stream": False})).json()
    *deltas, (last, result) = events
    assert last == "result" and result == plain
    assert deltas and all(e == "delta" for e, _ in deltas)
    for _, delta in deltas:
        assert set(delta) == fields(schemas.StreamDelta)
        assert schemas.StreamDelta.model_validate(delta).model_dump(mode="json") == delta


def _row(seed: int) -> dict:
    return {
        "prompt": "p", "formatted_prompt": "p", "completion": "c", "text": "pc",
        "tokens_generated": 1, "stopped_early": False, "finish_reason": "length", "seed": seed,
    }  # fmt: skip


def test_a_batch_response_holds_one_result_per_prompt_and_sample() -> None:
    echo = {"alpha": 1.0, "model_after": "a", "model_before": "b"}
    results = [_row(i) for i in range(6)]
    ok = schemas.LDABatchResponse(results=results, batch_size=3, n=2, **echo)
    assert ok.model_dump(mode="json")["results"][5] == _row(5)  # no logprobs key unless asked
    # The deleted fake server counted rows as batch_size; the contract refuses that shape.
    with pytest.raises(ValidationError, match="6 results for batch_size 6 x n 2"):
        schemas.LDABatchResponse(results=results, batch_size=6, n=2, **echo)
    with pytest.raises(ValidationError, match="batch_size 3 x n 1"):
        schemas.LDABatchResponse(results=results, batch_size=3, **echo)


async def test_a_stop_string_finish_reason_is_part_of_the_contract(llama_pair) -> None:
    async with serving(llama_pair) as http:
        probe = (
            await http.post("/generate_lda", json={"prompt": "hi", "max_new_tokens": 8, "seed": 1})
        ).json()
        stop = probe["completion"].split()[1]
        body = {"prompt": "hi", "max_new_tokens": 8, "seed": 1, "stop": stop}
        stopped = (await http.post("/generate_lda", json=body)).json()
    assert schemas.LDAResponse.model_validate(stopped).finish_reason == "stop"
