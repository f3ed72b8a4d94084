"""config_from_args: options fill the fields named like them; the rest keep their defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from batchserve.argconfig import config_from_args


@dataclass(frozen=True)
class Config:
    alpha: float = 1.0
    max_new_tokens: int = 80
    mode: str = "continuous"
    tags: tuple[str, ...] = ()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--scheduler", default="static")
    parser.add_argument("--tag", action="append", default=[])
    parser.add_argument("--port", type=int, default=8000)  # no field of that name: not passed
    return parser.parse_args(argv)


def test_options_fill_fields_of_their_name_and_values_win():
    args = parse(["--alpha", "4", "--max-new-tokens", "7", "--scheduler", "serial", "--tag", "x"])
    config = config_from_args(Config, args, mode=args.scheduler, tags=tuple(args.tag))
    assert config == Config(alpha=4.0, max_new_tokens=7, mode="serial", tags=("x",))


def test_fields_without_an_option_keep_their_default():
    config = config_from_args(Config, parse([]))
    assert config == Config(alpha=2.0, max_new_tokens=80, mode="continuous", tags=())


def test_a_value_naming_no_field_is_an_error():
    with pytest.raises(TypeError):
        config_from_args(Config, parse([]), nonsense=1)
