"""One lone request through the server against the loop a researcher writes by hand.

    python -m bench.lone                        # toy pair, 64 tokens, 10 alternating rounds
    python -m bench.lone --server-arg=--no-compile --rounds 5

The hand-written loop: two stock Hugging Face models (their default attention) with their own
KV caches (`DynamicCache`), amplify, temperature and top-p, `torch.multinomial`; in this
process, on the same pair, with the same torch threads as the server. The server: a real
`batchserve serve` process (continuous scheduler) on a free loopback port, one
`/generate_lda` request at a time with `ignore_eos`, so both generate exactly the same number
of tokens. The two alternate round by round, so background load hits both alike; the report
gives each side's median and the ratio (issue 20's target: server / loop <= 0.6).
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time

import httpx
import torch
from transformers import DynamicCache, LlamaForCausalLM

from batchserve.frontend import format_prompt
from batchserve.worker.models import load_pair
from bench.load import host_description
from bench.report import add_output_option, bench_parser, command_line, table, write_report
from bench.servers import LONE_PROMPT, add_server_options, server_args, start_servers

# transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); 5.17 knows only
# the old one. The caches are filled in place, so the outputs' copies are never read.
CACHE_ARG = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else ("past_key_values")
)


@torch.inference_mode()
def hand_written_loop(
    pair, prompt_ids: list[int], max_new_tokens: int, alpha: float, temperature: float,
    top_p: float, seed: int,
) -> list[int]:  # fmt: skip
    """Both models step in lockstep with their own caches; amplify, filter, draw."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids])
    cache_a, cache_b = (
        DynamicCache(config=pair.after.config),
        DynamicCache(config=pair.before.config),
    )
    out_a = pair.after(input_ids=ids, **{CACHE_ARG: cache_a}, use_cache=True)
    out_b = pair.before(input_ids=ids, **{CACHE_ARG: cache_b}, use_cache=True)
    logits_a, logits_b = out_a.logits[:, -1], out_b.logits[:, -1]
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        logits = logits_a + alpha * (logits_a - logits_b)
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        token = order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator))
        tokens.append(int(token))
        out_a = pair.after(input_ids=token, **{CACHE_ARG: cache_a}, use_cache=True)
        out_b = pair.before(input_ids=token, **{CACHE_ARG: cache_b}, use_cache=True)
        logits_a, logits_b = out_a.logits[:, -1], out_b.logits[:, -1]
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(
        "lone",
        "A lone request through the server vs a hand-written loop over two HF "
        "models, alternating; prints both medians and their ratio.",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens per request, both sides (64)"
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="alternating rounds; the medians count (10)"
    )
    add_server_options(parser, "torch threads, both sides")
    add_output_option(parser, "lone-toy-cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = load_pair("toy", device="cpu")  # stock attention: this copy never meets the runner
    prompt_ids = pair.tokenizer.encode(format_prompt(LONE_PROMPT))
    sampling = {"alpha": 1.0, "temperature": 0.8, "top_p": 0.95}
    body = {"prompt": LONE_PROMPT, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
    serve_args = server_args(args)
    loop_s: list[float] = []
    server_s: list[float] = []
    with start_servers(["continuous"], ["--after", "toy"], server_args=serve_args) as servers:
        url = servers["continuous"].url
        with httpx.Client(base_url=url, timeout=120) as client:
            for warm in range(2):  # the first request pays for first-call work on both sides
                client.post("/generate_lda", json=body | sampling | {"seed": warm})
                hand_written_loop(pair, prompt_ids, args.max_new_tokens, seed=warm, **sampling)
            for seed in range(args.rounds):
                started = time.perf_counter()
                tokens = hand_written_loop(
                    pair, prompt_ids, args.max_new_tokens, seed=seed, **sampling
                )
                loop_s.append(time.perf_counter() - started)
                assert len(tokens) == args.max_new_tokens
                started = time.perf_counter()
                resp = client.post("/generate_lda", json=body | sampling | {"seed": seed})
                server_s.append(time.perf_counter() - started)
                resp.raise_for_status()
                assert resp.json()["tokens_generated"] == args.max_new_tokens
            info = client.get("/info").json()["engine"]
    loop_median, server_median = statistics.median(loop_s), statistics.median(server_s)
    rows = [
        ["hand-written loop (two HF models, DynamicCache)", f"{loop_median * 1e3:.0f}"],
        [f"server (compiled: {info.get('compiled')})", f"{server_median * 1e3:.0f}"],
    ]
    ratio = server_median / loop_median
    text = (
        f"# One lone {args.max_new_tokens}-token request, {args.rounds} alternating rounds "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %z')})\n\n"
        f"- host: {host_description()}; torch threads {args.threads}, both sides\n"
        f"- command: `{command_line('lone', argv)}`\n\n"
        + table(["", "median ms"], rows)
        + f"\n\nserver / loop: {ratio:.2f} (issue 20's target: <= 0.6)\n"
    )
    print(text)
    report = {
        "benchmark": "lone",
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "server_args": serve_args,
        "engine": info,
        "loop_s": loop_s,
        "server_s": server_s,
        "ratio": ratio,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_report(args.output, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
