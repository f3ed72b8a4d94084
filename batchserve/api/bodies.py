"""Request bodies into plain data, cheaply and off the event loop: strict JSON, and the bound
on prompt length checked before any tokenizer runs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

# Deeper than any body of the API needs (an object holding a list of strings, or a list of
# message objects); the C parser recurses once per level and raises RecursionError near 1000.
MAX_JSON_DEPTH = 32
# Bodies above this are parsed in a worker thread, so a 16 MiB one does not hold up the loop.
INLINE_PARSE_BYTES = 64 * 1024
# A prompt longer than context x this many characters is refused before tokenizing. Real
# tokenizers average 3-5 characters per token on prose and rarely 10 on code or whitespace
# runs, so 32 is 6-10x headroom: no prompt that could fit the context is refused in practice,
# and the tokenizer never sees more than 32 x context characters (a 16 MiB body would
# otherwise cost seconds of tokenizing and gigabytes of memory before its 413).
MAX_CHARS_PER_TOKEN = 32


class BodyError(ValueError):
    """The body is not acceptable JSON: answered 400 with this message."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # Last-one-wins would let a proxy and the server read different parameters.
            raise BodyError(f"duplicate key {key!r} in a JSON object")
        result[key] = value
    return result


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def parse_json(body: bytes) -> Any:
    """json.loads, refusing duplicate keys and nesting deeper than MAX_JSON_DEPTH."""
    try:
        data = json.loads(body, object_pairs_hook=_reject_duplicates)
    except RecursionError:
        raise BodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except BodyError:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise BodyError(f"malformed JSON: {err}") from None
    # Nesting needs a bracket per level: few brackets (every normal body) means no walk.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _depth_exceeds(
        data, MAX_JSON_DEPTH
    ):
        raise BodyError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


async def parse_json_off_loop(body: bytes) -> Any:
    if len(body) <= INLINE_PARSE_BYTES:
        return parse_json(body)
    return await asyncio.to_thread(parse_json, body)


class BodyRejected(Exception):
    """A body refused before validation; each route family answers it in its own error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object: 400 for bad JSON, 422 for another JSON value, 499 when the
    client left. Content-Type, size and read time are enforced for every route by security.py."""
    try:
        data = await parse_json_off_loop(await request.body())
    except BodyError as err:
        raise BodyRejected(400, str(err)) from None
    except ClientDisconnect:
        raise BodyRejected(499, "client disconnected") from None
    if not isinstance(data, dict):
        raise BodyRejected(422, f"request body must be a JSON object, not {type(data).__name__}")
    return data


# Pydantic names each member of a union it tried in the location (`stop.constrained-str`,
# `stop.list[constrained-str].0`); a client knows the field by its own name.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (
        part in _UNION_TAGS or "[" in part or part.startswith(("constrained-", "function-"))
    )


def validation_problems(err: ValidationError) -> list[dict[str, str]]:
    """Each problem with its dotted field path ("body" for the whole body), once: the messages
    of our own validators without pydantic's "Value error, " in front."""
    problems: list[dict[str, str]] = []
    for e in err.errors(include_url=False, include_input=False):
        message = e["msg"]
        if e["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        loc = e["loc"]
        # An unknown or missing key's own name ends the location, whatever it looks like.
        named = loc[-1:] if e["type"] in ("extra_forbidden", "missing") else ()
        parts = [p for p in loc[: len(loc) - len(named)] if not _is_union_tag(p)] + list(named)
        problem = {
            "field": ".".join(str(p) for p in parts) or "body",
            "message": message,
            "type": e["type"],
        }
        if problem not in problems:
            problems.append(problem)
    return problems


def summarize(problems: list[dict[str, str]]) -> str:
    return "invalid request: " + "; ".join(f"{p['field']}: {p['message']}" for p in problems)


def max_prompt_chars(context_tokens: int) -> int:
    return context_tokens * MAX_CHARS_PER_TOKEN
