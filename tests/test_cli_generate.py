"""`batchserve generate`: offline generation from a prompts file to JSONL, in input order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from tiny_models import save_tiny_pair

from batchserve.api.app import ServerConfig
from batchserve.api.cli import build_parser, main, server_config_from_args
from batchserve.api.cli_generate import read_prompt_rows
from batchserve.core.scheduler import SchedulerConfig
from batchserve.core.types import RunnerConfig
from batchserve.schemas import GenerateLDABatchRequest

RESULT_FIELDS = {
    "index",
    "prompt",
    "alpha",
    "formatted_prompt",
    "completion",
    "text",
    "tokens_generated",
    "stopped_early",
    "finish_reason",
    "seed",
    "prompt_index",
    "temperature",
    "top_p",
}


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


def generate_argv(pair_dirs: tuple[str, str], prompts: Path, *options: str) -> list[str]:
    """`batchserve generate` with the tiny pair on disk and a prompts file, then `options`."""
    after, before = pair_dirs
    return ["generate", "--after", after, "--before", before, "--prompts", str(prompts), *options]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_jsonl_end_to_end_in_input_order(
    tmp_path: Path, pair_dirs: tuple[str, str]
) -> None:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"prompt": "tell me a long story about the cat", "max_new_tokens": 12, "seed": 3},
            {"prompt": "hi", "max_new_tokens": 2, "alpha": 0.0, "n": 3, "seed": 4},
            {"prompt": "the dog ran", "temperature": 0.0, "ignore_eos": True},
        ],
    )
    out = tmp_path / "out.jsonl"
    options = [
        "--output",
        str(out),
        "--max-new-tokens",
        "7",
        "--alpha",
        "2",
        "--max-batch-size",
        "2",
    ]
    cmd = [sys.executable, "-m", "batchserve.api.cli", *generate_argv(pair_dirs, prompts, *options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert [r["prompt_index"] for r in rows] == [0, 1, 1, 1, 2]
    assert all(set(r) == RESULT_FIELDS for r in rows)
    assert [r["alpha"] for r in rows] == [2.0, 0.0, 0.0, 0.0, 2.0]
    assert rows[0]["tokens_generated"] <= 12 and rows[0]["seed"] == 3
    assert rows[1]["seed"] == 4 and len({r["seed"] for r in rows[1:4]}) == 3
    assert all(r["tokens_generated"] <= 2 for r in rows[1:4])
    assert rows[4]["tokens_generated"] == 7 and rows[4]["temperature"] == 0.0
    assert all(r["text"] == r["formatted_prompt"] + r["completion"] for r in rows)
    assert "generate" in proc.stderr  # the progress bar


def test_generate_txt_to_stdout_is_reproducible_with_a_seed(
    tmp_path: Path, pair_dirs: tuple[str, str], capsys
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    argv = generate_argv(
        pair_dirs, prompts, "--seed", "11", "--max-new-tokens", "5", "--no-progress"
    )
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == first
    assert [json.loads(line)["prompt"] for line in first] == ["first prompt", "second prompt"]


def test_bad_prompt_rows_name_the_line_and_field(
    tmp_path: Path, pair_dirs: tuple[str, str]
) -> None:
    prompts = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": "x", "top_p": 3}])
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: top_p"):
        main(generate_argv(pair_dirs, prompts))
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--prompts", str(tmp_path / "missing.txt")])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--n", "0"], "--n"),
        (["--top-p", "3"], "--top-p"),
        (["--alpha", "nan"], "--alpha"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_sampling_options_are_refused_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: list[str], named: str
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models were loaded")

    monkeypatch.setattr("batchserve.worker.models.load_pair", no_loading)
    with pytest.raises(SystemExit, match=rf"^error: {named}: "):
        main(["generate", "--prompts", str(prompts), *options])


def test_a_prompt_too_long_is_named_and_leaves_no_output_file(
    tmp_path: Path, pair_dirs: tuple[str, str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n" + "word " * 2000 + "\nlast prompt\n")
    output = tmp_path / "out.jsonl"
    argv = generate_argv(pair_dirs, prompts, "--output", str(output), "--no-progress")
    with pytest.raises(SystemExit, match=r"prompts.txt: prompt 2 of 3 has \d+ tokens"):
        main(argv)
    assert not output.exists()


@pytest.mark.parametrize(
    "field",
    [
        {"alpha": 1e6},
        {"temperature": 101.0},
        {"top_k": 2**40},
        {"max_new_tokens": 2**40},
        {"n": 2**40},
        {"seed": 2**63},
        {"prompt": ""},
    ],
)
def test_prompt_rows_take_the_bounds_the_http_api_takes(field: dict, tmp_path: Path) -> None:
    """A line of a prompts file is refused exactly where a request body would be."""
    row = {"prompt": "hello", **field}
    with pytest.raises(ValidationError):
        GenerateLDABatchRequest.model_validate({"prompts": [row.pop("prompt")], **row})
    prompts = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hello", **field}])
    with pytest.raises(SystemExit, match=rf"bad.jsonl:1: {next(iter(field))}"):
        read_prompt_rows(prompts)


def test_help_lists_every_serve_option() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for option in (
        "--after",
        "--before",
        "--host",
        "--port",
        "--device",
        "--dtype",
        "--scheduler",
        "--max-batch-size",
        "--max-wait-ms",
        "--max-queue-rows",
        "--max-num-batched-tokens",
        "--prefix-cache",
        "--compile",
        "--max-new-tokens-limit",
        "--max-prompts-per-request",
        "--prompt-format",
        "--allow-incompatible",
        "--log-level",
    ):
        assert option in help_text


def test_serve_options_become_the_server_config() -> None:
    args = build_parser().parse_args(
        ["serve", "--scheduler", "static", "--max-batch-size", "8", "--api-key", "",
         "--allowed-hosts", "a.example,b.example", "--max-new-tokens-limit", "99",
         "--request-timeout-s", "7"]
    )  # fmt: skip
    config = server_config_from_args(args)
    assert config.scheduler == SchedulerConfig(mode="static", max_batch_size=8)
    assert config.runner is not None and config.runner.max_batch_size == 8
    # tests/conftest.py sets BATCHSERVE_COMPILE=0, which --compile's default reads.
    assert config.runner.compile is False
    assert config.api_key is None  # an empty key means none, not a key of ""
    assert config.allowed_hosts == ("a.example", "b.example")
    assert (config.max_new_tokens_limit, config.request_timeout_s) == (99, 7.0)
    assert server_config_from_args(build_parser().parse_args(["serve"])) == ServerConfig(
        runner=RunnerConfig(max_batch_size=SchedulerConfig().max_batch_size, compile=False)
    )


def test_generate_writes_logprobs_only_when_asked(
    tmp_path: Path, pair_dirs: tuple[str, str]
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nthe cat\n")
    base = generate_argv(
        pair_dirs, prompts, "--max-new-tokens", "4", "--seed", "5", "--temperature", "1",
        "--top-p", "1", "--ignore-eos", "--no-progress", "--threads", "1",
    )  # fmt: skip
    assert main([*base, "--output", str(tmp_path / "plain.jsonl")]) == 0
    asking = ["--output", str(tmp_path / "lp.jsonl"), "--logprobs", "--score-alphas", "0", "1"]
    assert main([*base, *asking]) == 0
    plain = [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    asked = [json.loads(x) for x in (tmp_path / "lp.jsonl").read_text().splitlines()]
    assert all("logprobs" not in r for r in plain)
    assert [r["completion"] for r in plain] == [r["completion"] for r in asked]
    for row in asked:
        lp = row["logprobs"]
        assert len(lp["after"]) == 4 and lp["score_alphas"] == [0.0, 1.0]
        assert lp["sum_score_alphas"][1] == pytest.approx(lp["sum_sampled"], abs=1e-4)


@pytest.mark.parametrize(
    ("preset", "expected"), [(None, "PASSIVE"), ("", ""), ("ACTIVE", "ACTIVE")]
)
def test_worker_threads_wait_passively_unless_the_environment_says(
    preset: str | None, expected: str
) -> None:
    """Set before torch loads OpenMP (a fresh interpreter), and never over the user's choice."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    code = (
        "import os\n"
        "from batchserve.api.cli_options import configure_threads\n"
        "configure_threads('2', 'cpu')\n"
        "import torch\n"
        "print(repr(os.environ.get('OMP_WAIT_POLICY')), torch.get_num_threads())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == [repr(expected), "2"]
