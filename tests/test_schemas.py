"""One wire contract: the server answers exactly the fields of the models the client reads,
and the client builds its requests with the models the server validates."""

from __future__ import annotations

import httpx
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


async def test_a_stop_string_finish_reason_is_part_of_the_contract(llama_pair) -> None:
    async with serving(llama_pair) as http:
        probe = (
            await http.post("/generate_lda", json={"prompt": "hi", "max_new_tokens": 8, "seed": 1})
        ).json()
        stop = probe["completion"].split()[1]
        body = {"prompt": "hi", "max_new_tokens": 8, "seed": 1, "stop": stop}
        stopped = (await http.post("/generate_lda", json=body)).json()
    assert schemas.LDAResponse.model_validate(stopped).finish_reason == "stop"
