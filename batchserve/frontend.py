"""Prompt formats: how a user's instruction becomes the text the models continue."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPT_FORMATS: tuple[str, ...] = ("alpaca", "chat", "raw")

ALPACA = "### Instruction:\n{prompt}\n\n### Response:\n"
# With a system prompt, it becomes the instruction and the user's text the input: the
# standard Alpaca layout for a task plus its material.
ALPACA_WITH_INPUT = "### Instruction:\n{system_prompt}\n\n### Input:\n{prompt}\n\n### Response:\n"


def format_prompt(
    prompt: str,
    prompt_format: str = "alpaca",
    *,
    system_prompt: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    if prompt_format == "alpaca":
        if system_prompt:
            return ALPACA_WITH_INPUT.format(system_prompt=system_prompt, prompt=prompt)
        return ALPACA.format(prompt=prompt)
    if prompt_format == "raw":
        return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    if prompt_format == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(
        f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, not {prompt_format!r}"
    )


def format_messages(
    messages: list[dict[str, str]],
    prompt_format: str = "alpaca",
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[str, str]:
    """A conversation (`role`/`content` dicts) as prompt text, and the format to encode it with.

    The tokenizer's chat template where it has one (encoded as "chat": the template writes
    BOS), otherwise the server's prompt format: alpaca turns, or plain text for raw.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, "chat"
    if prompt_format == "chat":
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [m for m in messages if m["role"] != "system"]
    if prompt_format == "raw":
        return format_prompt(
            "\n\n".join(m["content"] for m in turns), "raw", system_prompt=system
        ), "raw"
    text = ""
    for turn in turns:
        if turn["role"] == "user":
            # The system prompt goes with the first instruction, as in single-turn alpaca.
            text += format_prompt(turn["content"], prompt_format, system_prompt=system)
            system = None
        else:
            text += turn["content"] + "\n\n"
    if turns and turns[-1]["role"] != "user":
        text = text.removesuffix("\n\n")  # the assistant's text so far: continue it
    return text, prompt_format
