"""Command-line options to config objects, matched by field name.

The rule vLLM's `EngineArgs.from_cli_args` follows: an option whose dest is a field's name fills
that field, so a field added to a config and to its parser cannot be forgotten in between. Light
(no torch) so that the client's commands use it too.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """`cls` (a dataclass) from the options named like its fields; `values` name the fields
    whose option is spelled differently or needs converting, and win over the options."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and hasattr(args, f.name)
    }
    return cls(**{**given, **values})
