"""The /v1 OpenAI-compatible routes, driven by the official `openai` package over the network."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from servers import client_of, running_server

from batchserve.api.app import ServerConfig, create_app
from batchserve.core.scheduler import SchedulerConfig
from batchserve.frontend import format_messages
from batchserve.worker.models import load_pair, load_tokenizer

MODEL = "toy:after"
PROMPT = "### Instruction:\nWrite a poem about the sea\n\n### Response:\n"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server(["--log-level", "warning"]) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def joined_choices(stream) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
    return texts


def test_models_lists_the_served_pair(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["lda"] == {"after": "toy:after", "before": "toy:before"}


def native_batch(server: str, prompts: list[str], **fields: object) -> list[dict]:
    """The same rows through /generate_lda_batch, with OpenAI's defaults and a raw prompt."""
    body = {"prompts": prompts, "temperature": 1.0, "top_p": 1.0, "apply_chat_template": False}
    return httpx.post(server + "/generate_lda_batch", json=body | fields, timeout=60).json()[
        "results"
    ]


def test_completion_with_extra_body_alpha_matches_the_native_route(
    client: openai.OpenAI, server: str
) -> None:
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=20, n=3, seed=7, extra_body={"alpha": 2}
    )
    assert out.object == "text_completion" and out.model == MODEL
    assert [c.index for c in out.choices] == [0, 1, 2]
    native = native_batch(server, [PROMPT], n=3, max_new_tokens=20, seed=7, alpha=2.0)
    assert [c.text for c in out.choices] == [r["completion"] for r in native]
    assert [c.model_extra["seed"] for c in out.choices] == [r["seed"] for r in native]
    assert out.usage.completion_tokens == sum(r["tokens_generated"] for r in native)
    assert out.model_extra["alpha"] == 2.0


def test_streamed_completion_joins_to_the_non_streamed_one(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "n": 2, "seed": 3}
    kwargs["extra_body"] = {"alpha": 2, "top_k": 50}
    whole = client.completions.create(**kwargs)
    streamed = joined_choices(client.completions.create(**kwargs, stream=True))
    assert streamed == {c.index: c.text for c in whole.choices}


def test_prompt_lists_token_prompts_and_echo(client: openai.OpenAI, server: str) -> None:
    prompts = [PROMPT, "### Instruction:\nTell me a story\n\n### Response:\n"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, n=2, seed=1)
    native = native_batch(server, prompts, n=2, max_new_tokens=8, seed=1)
    assert [c.text for c in out.choices] == [r["completion"] for r in native]  # prompt-major

    ids = load_tokenizer("toy:after").encode(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, seed=1)
    assert by_ids.choices[0].text == out.choices[0].text

    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=1, echo=True)
    assert echoed.choices[0].text == PROMPT + out.choices[0].text


def test_chat_completion_streaming_and_not(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Write a poem about the sea"},
    ]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 24, "seed": 5}
    kwargs["extra_body"] = {"alpha": 2}
    whole = client.chat.completions.create(**kwargs, n=2)
    assert whole.object == "chat.completion" and len(whole.choices) == 2
    assert whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            **kwargs, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}


def test_stop_ends_a_choice_with_finish_reason_stop(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, seed=2, stop=[" ", "\n"], n=2
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop" and " " not in choice.text
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a poem"}],
        max_tokens=40,
        seed=2,
        stop=" ",
    )
    assert chat.choices[0].finish_reason == "stop" and " " not in chat.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "code"),
    [
        ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"temperature": -1}, 400, "temperature", None),
        ({"extra_body": {"alpah": 2}}, 400, "alpah", None),
        ({"extra_body": {"alpha": "big"}}, 400, "alpha", None),
        ({"max_tokens": 10**6}, 400, "max_tokens", None),
        ({"presence_penalty": 0.5}, 400, "presence_penalty", None),
    ],
)
def test_errors_use_openai_error_shape(
    client: openai.OpenAI, kwargs: dict, status: int, param: str | None, code: str | None
) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4} | kwargs
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**body)
    assert info.value.status_code == status
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code


def test_a_long_prompt_is_refused_with_context_length_exceeded(server: str) -> None:
    resp = httpx.post(
        server + "/v1/completions",
        json={"model": MODEL, "prompt": [list(range(3, 500))], "max_tokens": 100},
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    # A chat without max_tokens gets what the context leaves: none left is said as such.
    chat = httpx.post(
        server + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello " * 600}]},
    )
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
    assert "no room is left for even one new token" in chat.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"stop": [3]}, "stop.0", "Input should be a valid string"),
        ({"presence_penalty": 1}, "presence_penalty", "presence_penalty is not supported"),
        # An unknown key is named even where it looks like one of pydantic's union tags.
        ({"stop[]": "x"}, "stop[]", "Extra inputs are not permitted"),
        ({"int": 1}, "int", "Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_is_named_as_the_client_wrote_it(
    server: str, body: dict, field: str, message: str
) -> None:
    resp = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "hi"} | body)
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == field.split(".")[0]
    assert error["message"].startswith("invalid request: ")
    assert f"{field}: {message}" in error["message"]
    assert "constrained" not in error["message"] and "Value error" not in error["message"]


@pytest.mark.parametrize("prompt", [[], [[]], "", [""], ["a question", ""]])
def test_an_empty_prompt_is_refused_not_left_hanging(server: str, prompt: object) -> None:
    resp = httpx.post(
        server + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 4},
        timeout=10,
    )
    if prompt == "":  # the toy tokenizer writes BOS, so "" is a one-token prompt
        assert resp.status_code == 200
    else:
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    if isinstance(prompt, list) and "" in prompt:  # refused as the LDA routes refuse it
        assert f"prompt {prompt.index('')} of the list is empty" in resp.json()["error"]["message"]


def test_chat_without_a_template_uses_the_server_prompt_format() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fruit"},
        {"role": "assistant", "content": "Mango."},
        {"role": "user", "content": "Another"},
    ]
    text, fmt = format_messages(messages, "alpaca")
    assert fmt == "alpaca"
    assert text == (
        "### Instruction:\nBe brief.\n\n### Input:\nName a fruit\n\n### Response:\n"
        "Mango.\n\n### Instruction:\nAnother\n\n### Response:\n"
    )
    assert format_messages(messages[:2], "raw") == ("Be brief.\n\nName a fruit", "raw")
    with pytest.raises(ValueError, match="chat template"):
        format_messages(messages, "chat")
    # A tokenizer with a template wins (the toy's is the alpaca layout, with BOS).
    text, fmt = format_messages(messages[:2], "raw", tokenizer=load_tokenizer("toy:after"))
    assert fmt == "chat" and text.startswith("<s>### Instruction:\nBe brief.")


async def test_more_rows_than_the_queue_holds_are_refused_up_front() -> None:
    config = ServerConfig(scheduler=SchedulerConfig(max_queue_rows=4))
    async with client_of(create_app(config, pair=load_pair("toy"))) as client:
        body = {"model": MODEL, "prompt": ["a", "b"], "n": 3, "max_tokens": 2}
        resp = await client.post("/v1/completions", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
        resp = await client.post("/v1/completions", json=body | {"n": 2})
        assert resp.status_code == 200 and len(resp.json()["choices"]) == 4


async def test_a_full_or_draining_server_answers_503_in_openai_shape_with_retry_after() -> None:
    config = ServerConfig(scheduler=SchedulerConfig(max_batch_size=1, max_queue_rows=4))
    app = create_app(config, pair=load_pair("toy"))
    async with client_of(app) as client:
        engine = app.state.engine
        body = {"prompts": ["a", "b", "c", "d"], "max_new_tokens": 60, "ignore_eos": True}
        first = asyncio.create_task(client.post("/generate_lda_batch", json=body))
        deadline = time.monotonic() + 60
        while engine.num_waiting_rows != 3:
            assert time.monotonic() < deadline, "the batch's rows never queued behind the first"
            await asyncio.sleep(0.002)
        resp = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 2, "max_tokens": 2}
        )
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        error = resp.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_overloaded"
        assert "queue full" in error["message"]
        assert (await first).status_code == 200

        app.state.is_draining = True  # what the server sets when a shutdown begins
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        for route, payload, message in (
            ("/v1/chat/completions", chat, lambda r: r.json()["error"]["message"]),
            ("/generate_lda", {"prompt": "hi"}, lambda r: r.json()["error"]),
        ):
            resp = await client.post(route, json=payload)
            assert resp.status_code == 503 and resp.headers["retry-after"] == "5"
            assert message(resp) == "server is shutting down"


def test_openai_bodies_get_the_native_routes_door_checks(server: str) -> None:
    url = server + "/v1/completions"
    dup = httpx.post(
        url,
        content=b'{"model": "toy:after", "prompt": "a", "prompt": "b"}',
        headers={"content-type": "application/json"},
    )
    assert dup.status_code == 400 and "duplicate key" in dup.json()["error"]["message"]
    huge = httpx.post(url, json={"model": MODEL, "prompt": "x" * 200_000, "max_tokens": 1})
    assert huge.status_code == 400
    assert huge.json()["error"]["code"] == "context_length_exceeded"
    # A temperature below the epsilon is greedy: the seed no longer matters.
    texts = {
        httpx.post(
            url,
            json={
                "model": MODEL,
                "prompt": PROMPT,
                "max_tokens": 12,
                "temperature": 1e-9,
                "seed": s,
            },
            timeout=60,
        ).json()["choices"][0]["text"]
        for s in (1, 2, 3)
    }
    assert len(texts) == 1


# --- log-probabilities ----------------------------------------------------------------------


def test_completion_logprobs_match_the_native_route_and_change_no_token(
    client: openai.OpenAI, server: str
) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "n": 2, "seed": 11}
    kwargs["extra_body"] = {"alpha": 1.5, "top_k": 40}
    plain = client.completions.create(**kwargs)
    out = client.completions.create(**kwargs, logprobs=0)
    assert [c.text for c in out.choices] == [c.text for c in plain.choices]
    assert all(c.logprobs is None for c in plain.choices)
    native = native_batch(
        server, [PROMPT], n=2, max_new_tokens=20, seed=11, alpha=1.5, top_k=40, logprobs=True
    )
    for choice, row in zip(out.choices, native, strict=True):
        lp = choice.logprobs
        assert lp.token_logprobs == row["logprobs"]["sampled"]
        assert lp.model_extra["after_logprobs"] == row["logprobs"]["after"]
        assert lp.model_extra["before_logprobs"] == row["logprobs"]["before"]
        assert len(lp.tokens) == row["tokens_generated"] == len(lp.text_offset)
        assert "".join(lp.tokens) == choice.text
        offsets = zip(lp.text_offset, lp.tokens, strict=True)
        assert [choice.text[o : o + len(t)] for o, t in offsets] == lp.tokens
        assert lp.top_logprobs is None
        assert all(v <= 0 for v in lp.token_logprobs), lp.token_logprobs


def test_chat_logprobs_give_one_entry_per_token(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a poem about the sea"}]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 16, "seed": 4}
    plain = client.chat.completions.create(**kwargs)
    out = client.chat.completions.create(**kwargs, logprobs=True)
    text = out.choices[0].message.content
    assert text == plain.choices[0].message.content and plain.choices[0].logprobs is None
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(e.token for e in content) == text
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8") == text
    for entry in content:
        assert entry.top_logprobs == [] and entry.logprob <= 0
        assert entry.model_extra["after_logprob"] <= 0 and entry.model_extra["before_logprob"] <= 0


def test_a_stream_carries_the_logprobs_in_each_finishing_chunk(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "n": 2, "seed": 8, "logprobs": 0}
    whole = client.completions.create(**kwargs)
    finishing = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            if choice.finish_reason:
                finishing[choice.index] = choice.logprobs
            else:
                assert choice.logprobs is None
    assert {i: lp.token_logprobs for i, lp in finishing.items()} == {
        c.index: c.logprobs.token_logprobs for c in whole.choices
    }
    assert {i: lp.tokens for i, lp in finishing.items()} == {
        c.index: c.logprobs.tokens for c in whole.choices
    }


def test_completion_logprobs_describe_the_text_a_stop_string_cut(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, "seed": 5, "logprobs": 0}
    whole = client.completions.create(**kwargs).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert len(stop) == 2 and stop in whole
    choice = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert choice.finish_reason == "stop" and len(choice.text) < len(whole)
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert all(o <= len(choice.text) for o in lp.text_offset)
    assert len(lp.tokens) == len(lp.token_logprobs)


def test_chat_logprobs_null_means_no(client: openai.OpenAI, server: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    resp = httpx.post(f"{server}/v1/chat/completions", json=body | {"logprobs": None}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    ("route", "fields", "param"),
    [
        ("completions", {"logprobs": 5}, "logprobs"),
        ("completions", {"logprobs": 0, "echo": True}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
        ("chat/completions", {"top_logprobs": 0}, "top_logprobs"),
    ],
)
def test_unsupported_logprobs_requests_are_refused_clearly(
    server: str, route: str, fields: dict, param: str | None
) -> None:
    body = {"model": MODEL, "max_tokens": 4} | fields
    body |= (
        {"prompt": "hi"}
        if route == "completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    resp = httpx.post(f"{server}/v1/{route}", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert "logprobs" in error["message"]


def test_errors_before_a_route_runs_take_the_routes_shape(server: str) -> None:
    unknown = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Not Found"
    wrong_type = httpx.post(server + "/v1/completions", content="{}")  # no Content-Type
    assert wrong_type.status_code == 415
    assert wrong_type.json()["error"]["type"] == "invalid_request_error"
    bare = httpx.get(server + "/v1")
    assert bare.status_code == 404 and bare.json()["error"]["message"] == "Not Found"
    native = httpx.get(server + "/nope")
    assert native.status_code == 404 and native.json()["error"] == "Not Found"
