"""CUDA graphs of the decode step: both models and the sampler, replayed per shape bucket.

A decode step of a 7B pair launches ~1,300 kernels for the models and ~100 for the sampler; on
an H100 the launches, not the weights, set the pace at small batches. A graph records them
once per bucket and replays them with one call.

A graph reads and writes fixed addresses, so each bucket (`GraphKey`: packed tokens, key
positions, sampled rows and the sampling plan) owns static input tensors. A step copies its
inputs into them (padding included: padding rows read and write the reserved block 0, so stale
rows of a larger earlier step never linger), replays, and reads the static outputs before the
next step replays anything. All graphs share one memory pool: an output is used within its
step, so a later graph may reuse the memory of an earlier one's intermediates.

Capture is lazy (the first step of each bucket) and its cost is reported. `capture` is a
parameter so that the CPU tests can run this module with `replay_by_call`, which keeps the
same static-buffer contract without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from batchserve.worker.sampling import SamplingPlan

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor, ...]
Step = Callable[[Mapping[str, torch.Tensor]], Outputs]  # what a graph records, over its inputs
# Records `step` (which reads and writes only the static tensors it closes over) once; returns
# its static outputs and the function that replays it.
Capture = Callable[[Callable[[], Outputs]], tuple[Outputs, Callable[[], None]]]

MAX_GRAPHS = 256


class CaptureError(RuntimeError):
    """Recording a graph failed (the step itself may still run without one)."""


@dataclass(frozen=True)
class GraphKey:
    """What fixes a graph's shapes and kernels."""

    tokens: int  # packed tokens: one query per decoding row, padded
    keys: int  # width of the read index: key positions (or blocks) each row may read
    sampled: int  # rows whose logits are kept, padded
    plan: SamplingPlan | None  # the sampler's branches; None: the models only


class CudaCapture:
    """`Capture` on CUDA: a warm-up run on a side stream (as torch.cuda.graph asks), then the
    recording, in the pool all graphs share. Everything runs with the models' device current:
    streams belong to the device current when they are made, and kernels on another device's
    tensors would go to that device's stream, unrecorded (an empty graph replays as nothing)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)

    def __call__(self, step: Callable[[], Outputs]) -> tuple[Outputs, Callable[[], None]]:
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                step()
            torch.cuda.current_stream().wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: only this (the worker's) thread must stay off unsafe CUDA calls.
            with torch.cuda.graph(
                graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
            ):
                outputs = step()

        def replay() -> None:
            with torch.cuda.device(self.device):
                graph.replay()

        return outputs, replay


def replay_by_call(step: Callable[[], Outputs]) -> tuple[Outputs, Callable[[], None]]:
    """`Capture` without a GPU: a replay calls `step` again and copies its results into the
    first call's outputs, which is what a replayed graph leaves in its static outputs."""
    outputs = step()

    def replay() -> None:
        for static, fresh in zip(outputs, step(), strict=True):
            static.copy_(fresh)

    return outputs, replay


@dataclass
class _Graph:
    inputs: dict[str, torch.Tensor]
    outputs: Outputs
    replay: Callable[[], None]


class StepGraphs:
    """One recorded step per `GraphKey`, captured the first time the key is seen; `make_step`
    gives the step a key records (called only then)."""

    def __init__(
        self, capture: Capture, make_step: Callable[[GraphKey], Step], max_graphs: int = MAX_GRAPHS
    ) -> None:
        self._capture = capture
        self._make_step = make_step
        self._graphs: dict[GraphKey, _Graph] = {}
        self.max_graphs = max_graphs
        self.capture_s = 0.0
        self.num_replays = 0

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def has_room(self, key: GraphKey) -> bool:
        return key in self._graphs or len(self._graphs) < self.max_graphs

    def run(self, key: GraphKey, inputs: Mapping[str, torch.Tensor]) -> Outputs:
        """The key's step over `inputs`, by its graph: the inputs copied into its static
        tensors, one replay; the outputs are the graph's own tensors, valid until the next
        `run`."""
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._record(key, inputs)
        for name, tensor in inputs.items():
            static = graph.inputs[name]
            if static.shape != tensor.shape:  # copy_ would broadcast it silently
                raise ValueError(f"{name} {tuple(tensor.shape)} for a graph of {key}")
            static.copy_(tensor)
        graph.replay()
        self.num_replays += 1
        return graph.outputs

    def _record(self, key: GraphKey, inputs: Mapping[str, torch.Tensor]) -> _Graph:
        started = time.perf_counter()
        step = self._make_step(key)
        # Static inputs start as this step's own, so the warm-up and the recording run on
        # real values (they write this step's keys and values, which its replay rewrites).
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        try:
            outputs, replay = self._capture(lambda: step(static))
        except Exception as err:
            raise CaptureError(f"recording the graph of {key} failed: {err}") from err
        graph = _Graph(static, outputs, replay)
        self._graphs[key] = graph
        elapsed = time.perf_counter() - started
        self.capture_s += elapsed
        log.debug("captured %s in %.3f s (%d graphs)", key, elapsed, len(self._graphs))
        return graph
