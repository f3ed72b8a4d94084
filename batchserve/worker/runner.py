"""The model runner: `execute(plan) -> output`, one forward per model per step.

Tensors only. The runner owns both models and their paged KV stores (allocated once), and knows
rows only as the plan describes them: tokens, positions, block tables and sampling parameters.
Per step it packs the decoding rows' tokens and the prompt chunks into one sequence [1, N],
runs each model once over it (attention reads every row's KV through its block table,
worker/attention.py), amplifies and samples the rows that draw a token, computes the
log-probabilities of rows that asked from the very tensors the sampler used, and copies the
result to the host once.

A LoRA pair (worker/lora.py) is one model: every row is packed twice, its before copy and its
after copy, and the one forward over the base gives each token its adapter's delta; the copies
keep their KV in one store of twice the blocks (the after copy's blocks are the row's own,
shifted by the number of blocks), so the scheduler's block tables serve both.

Shapes: the decoding rows, the prompt tokens, the chunks and the sampled rows are each padded
to at least 2 (torch.compile specialises on 0 and 1; padding rows read and write the reserved
block 0), and on CUDA to a small set of buckets, where each decode step is a replayed CUDA
graph (worker/cuda_graphs.py). With `compile` the step's forward is compiled once with dynamic
shapes, so a steady stream of steps never recompiles, whatever the sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import PreTrainedModel

from batchserve.core.types import (
    RunnerConfig,
    SamplingParams,
    ScheduledRow,
    StepOutput,
    StepPlan,
)
from batchserve.worker import native
from batchserve.worker.attention import (
    ATTENTION_NAME,
    KVStore,
    PagedBatch,
    PagedCall,
    ShapeProbe,
)
from batchserve.worker.cuda_graphs import (
    Capture,
    CaptureError,
    CudaCapture,
    GraphKey,
    Outputs,
    Step,
    StepGraphs,
)
from batchserve.worker.host import upload
from batchserve.worker.lora import BASE
from batchserve.worker.models import ModelPair
from batchserve.worker.sampling import sample_step
from batchserve.worker.step_compile import compile_default, compile_step, cpp_wrapper_default
from batchserve.worker.step_sampler import StepSampler

log = logging.getLogger(__name__)

_CPU_DEFAULT_TOKENS_PER_ROW = 2048
_CPU_MAX_KV_BYTES = 4 << 30
_MIN_SIZE = 2  # torch.compile specialises sizes 0 and 1; padding keeps every size above
# A prompt chunk whose tokens read at most this many keys in all goes through the C decode
# attention, one query per token (a 20-token prompt: 400), rather than an SDPA of its own; a
# step with one such chunk beside 31 decoding rows spent ~1.5 ms of ~12.8 in that SDPA op.
_SHORT_CHUNK_READS = 4096


def _env_switch(name: str) -> bool | None:
    """BATCHSERVE_<name> as a switch (1/true/yes/on or 0/false/no/off); None where unset."""
    setting = os.environ.get(f"BATCHSERVE_{name}", "").lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    return None


def bucket(n: int, step: int = 8) -> int:
    """The padded size of n: at least 2, then powers of two up to `step`, then multiples of it."""
    if n <= _MIN_SIZE:
        return _MIN_SIZE
    if n <= step:
        return 1 << (n - 1).bit_length()
    return math.ceil(n / step) * step


class ModelRunner:
    """Both models and their KV stores; executes step plans."""

    def __init__(
        self, pair: ModelPair, config: RunnerConfig | None = None, *,
        graph_capture: Capture | None = None,
    ) -> None:  # fmt: skip
        """`graph_capture`: how decode steps are recorded (worker/cuda_graphs.py); by default
        CUDA graphs on CUDA, where `config.cuda_graphs` allows them. The tests pass
        `replay_by_call` to run the same path on the CPU."""
        self.pair = pair
        self.config = config or RunnerConfig()
        self.device = pair.device
        self.vocab = pair.vocab_limit
        sync_free = self.config.sync_free
        self.sync_free = self.device.type == "cuda" if sync_free is None else sync_free
        self.num_host_transfers = 0  # device-to-host copies (tests count them)
        self.num_steps = 0
        models = (pair.after, pair.before)
        if self.device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
            # cuDNN's SDPA re-plans for every new KV length: 2 ms of host time per call was
            # measured on an H200, more than a whole 7B decode step's weight streaming.
            torch.backends.cuda.enable_cudnn_sdp(False)
            log.info("cuDNN attention disabled: it re-plans for every KV length")
        # A LoRA pair is one model: its store holds each row twice, the before copy in
        # blocks 0..num_blocks-1 and the after copy in the same blocks shifted by num_blocks.
        self.lora = pair.lora
        probes = [self._probe_shapes(m) for m in (models[:1] if self.lora else models)]
        copies = 2 if self.lora else 1
        bytes_per_token = sum(p.bytes_per_token for p in probes) * copies
        bs = self.config.block_size
        num_tokens = self._kv_tokens(bytes_per_token)
        self._num_blocks = max(2, num_tokens // bs + 1)  # + the reserved block 0
        self.stores = tuple(
            KVStore(p.shapes, p.dtype, copies * self._num_blocks * bs, self.device) for p in probes
        )
        self._adapter_index: dict[tuple[str | None, str | None], tuple[int, int]] = {}
        self.kv_bytes = sum(s.num_bytes for s in self.stores)
        capacity = (self._num_blocks - 1) * bs
        self._max_row_tokens = min(pair.max_context, capacity)
        self.native_attention = self._native_attention(probes)
        self.native_sampler = self._native_sampler()
        self.is_compiled = (
            compile_default(self.device, _env_switch("COMPILE"))
            if self.config.compile is None
            else self.config.compile
        )
        self.cpp_wrapper = self.is_compiled and cpp_wrapper_default(
            self.device, _env_switch("CPP_WRAPPER")
        )
        self.compile_s: float | None = None
        self._is_warm = False  # compiled and warmed up: guards may be skipped
        self._forward = self._forward_eager
        if self.is_compiled:
            self._forward = compile_step(self._forward_eager, self.cpp_wrapper)
        log.info(
            "KV store: %d tokens in %d blocks of %d (%.1f MiB for both models)%s",
            capacity, self._num_blocks - 1, bs, self.kv_bytes / 2**20,
            "; compiling the step" if self.is_compiled else "",
        )  # fmt: skip
        self._graphs = self._step_graphs(graph_capture)
        self._arena: torch.Tensor | None = None  # see _logits_arena
        # Padding granularity (rows, prompt tokens). On the CPU the compiled step takes any
        # size >= 2 without recompiling, so padding only costs compute: a 20-token chunk
        # padded to 32 ran 12 rows of waste through every matrix product of its step. With
        # graphs (CUDA) each bucket is a graph: few buckets.
        bucketed = self.device.type != "cpu" or self._graphs is not None
        self._row_step, self._token_step = (8, 16) if bucketed else (1, 1)
        self.sampler = StepSampler(
            self.device, self.vocab, self.config.top_k_cap, sync_free=self.sync_free,
            native=self.native_sampler,
            graph_padding=None if self._graphs is None else self._sampled_rows,
        )  # fmt: skip
        if self.is_compiled:
            self.warm_up()

    # --- the Runner protocol ----------------------------------------------------------------

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def max_row_tokens(self) -> int:
        return self._max_row_tokens

    def info(self) -> dict[str, object]:
        graphs = self._graphs  # read once: the worker may turn graphs off meanwhile
        return {
            "kv_cache_tokens": (self._num_blocks - 1) * self.block_size,
            "kv_block_size": self.block_size,
            "kv_cache_bytes": self.kv_bytes,
            "max_row_tokens": self.max_row_tokens,
            "top_k_cap": self.config.top_k_cap,
            "sync_free_sampling": self.sync_free,
            "attention": ATTENTION_NAME,
            "native_decode_attention": self.native_attention,
            "native_sampler": self.native_sampler,
            "compiled": self.is_compiled,
            "compile_s": self.compile_s,
            "cpp_wrapper": self.cpp_wrapper,
            "cuda_graphs": graphs is not None,
            "cuda_graphs_captured": None if graphs is None else graphs.num_graphs,
            "cuda_graph_capture_s": None if graphs is None else graphs.capture_s,
            "lora": None if self.lora is None else self.lora.describe(),
        }

    # --- set-up -----------------------------------------------------------------------------

    def _compile_failed(self, error: Exception) -> None:
        """A step that would not compile (no C++ compiler, headers missing): the Python
        wrapper where the C++ one failed, then eager, unless compiling was asked for."""
        if self.cpp_wrapper:
            log.warning("the step's C++ wrapper did not build (%s); trying the Python one", error)
            self.cpp_wrapper = False
            self._forward = compile_step(self._forward_eager, cpp_wrapper=False)
        elif self.config.compile or _env_switch("COMPILE"):
            raise RuntimeError(f"the step was asked to compile and could not: {error}") from error
        else:
            log.warning("the step did not compile (%s); it runs eagerly (slower)", error)
            self.is_compiled = False
            self._forward = self._forward_eager

    def _step_graphs(self, capture: Capture | None) -> StepGraphs | None:
        """Decode steps replayed as graphs: by default on CUDA (not yet for a LoRA pair, whose
        adapters' per-token index lives outside the step's inputs); the config (else
        BATCHSERVE_CUDA_GRAPHS, which the CLI's --cuda-graphs reads too) can ask or refuse."""
        wanted = self.config.cuda_graphs
        if wanted is None:
            wanted = _env_switch("CUDA_GRAPHS")
        fits = self.lora is None and (capture is not None or self.device.type == "cuda")
        if wanted is False or (wanted is None and not fits):
            return None
        if self.lora is not None:
            raise ValueError("CUDA graphs do not serve a LoRA pair yet (--no-cuda-graphs)")
        if not fits:
            raise ValueError("CUDA graphs need a CUDA device (--no-cuda-graphs)")
        return StepGraphs(capture or CudaCapture(self.device), self._graphed_step)

    def _native_attention(self, probes: list[ShapeProbe]) -> bool:
        """Whether decoding rows use the C attention (worker/native.py): by default on the CPU
        in float32 with one head size for keys and values and one torch thread, where it
        builds; the config (else BATCHSERVE_NATIVE_ATTENTION, which the CLI's
        --native-attention reads too) can ask for it or refuse it."""
        fits = self.device.type == "cpu" and all(
            p.dtype == torch.float32 and all(kd == vd for _, kd, vd in p.shapes.values())
            for p in probes
        )
        # One thread: the kernel runs its rows on one core, where inductor's kernel would use
        # every torch thread; measured only on a 2-core host (auto = 1 thread there).
        return self._use_native(
            self.config.native_attention, "NATIVE_ATTENTION", "decode attention", fits,
            "serves float32 models on the CPU only", torch.get_num_threads() == 1,
            native.available,
        )  # fmt: skip

    def _native_sampler(self) -> bool:
        """Whether the step samples in C (worker/native.py): by default on the CPU wherever it
        builds (the logits are made float32 for it); the config, else BATCHSERVE_NATIVE_SAMPLER
        (which the CLI's --native-sampler reads too), can ask for it or refuse it."""
        return self._use_native(
            self.config.native_sampler, "NATIVE_SAMPLER", "sampler",
            self.device.type == "cpu", "runs on the CPU only", True, native.sampler_available,
        )  # fmt: skip

    @staticmethod
    def _use_native(
        wanted: bool | None, env: str, what: str, fits: bool, unfit: str, by_default: bool,
        available: Callable[[], bool],
    ) -> bool:  # fmt: skip
        """One rule for the C kernels: asked for (config, else BATCHSERVE_<env>) it must fit
        and build, else an error; refused, off; left open, on where it fits, `by_default`
        holds and it builds."""
        if wanted is None:
            wanted = _env_switch(env)
        if wanted is False or (wanted is None and not (fits and by_default)):
            return False
        if not fits:
            raise ValueError(f"the C {what} {unfit}")
        if not available():
            if wanted:
                raise RuntimeError(f"the C {what} could not be built (see the log)")
            return False
        return True

    def _probe_shapes(self, model: PreTrainedModel) -> ShapeProbe:
        probe = ShapeProbe()
        model.set_attn_implementation(ATTENTION_NAME)
        with torch.inference_mode():
            ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1, batchserve=probe)
        if not probe.shapes:
            raise ValueError(
                f"{type(model).__name__} does not route attention through transformers' "
                "AttentionInterface, so the runner cannot serve it"
            )
        if probe.uses_softcap:
            raise ValueError(
                f"{type(model).__name__} soft-caps its attention logits (e.g. Gemma-2), which "
                "the runner's attention does not implement"
            )
        return probe

    def _kv_tokens(self, bytes_per_token: int) -> int:
        config = self.config
        if config.kv_cache_tokens is not None:
            return config.kv_cache_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # Headroom for activations: prefill hidden states and both models' logits.
            budget = int(total * config.gpu_memory_fraction) - used - (2 << 30)
            if budget < bytes_per_token * config.block_size:
                raise MemoryError(
                    f"no GPU memory left for the KV store at --gpu-memory-fraction "
                    f"{config.gpu_memory_fraction} ({used / 2**30:.1f} GiB in use of "
                    f"{total / 2**30:.1f} GiB)"
                )
            return budget // bytes_per_token
        tokens = config.max_batch_size * min(self.pair.max_context, _CPU_DEFAULT_TOKENS_PER_ROW)
        return max(config.block_size, min(tokens, _CPU_MAX_KV_BYTES // bytes_per_token))

    def warm_up(self) -> float:
        """Compile the step now (a few decoding rows beside a prompt chunk, all in the reserved
        block), so the first request does not wait for it; returns the seconds it took."""
        params = SamplingParams(temperature=0.0, max_new_tokens=1)
        decoding = [ScheduledRow(-1 - i, (1,), 3, (0,), params, 0, True, 0) for i in range(3)]
        # A chunk too long to ride as queries of the C attention (_rides_as_queries).
        n = math.isqrt(_SHORT_CHUNK_READS) + 1
        blocks = (0,) * math.ceil(n / self.block_size)
        chunk = ScheduledRow(-9, (1,) * n, 0, blocks, params, 0, True, 0)
        started = time.perf_counter()
        # The two graphs: steps whose queries all go through the decode attention (most),
        # and steps with prompt chunks attended per chunk.
        while True:
            try:
                self.execute(StepPlan(tuple(decoding)))
                self.execute(StepPlan((*decoding, chunk)))
                break
            except torch._dynamo.exc.BackendCompilerFailed as error:
                self._compile_failed(error)
        elapsed = time.perf_counter() - started
        self.compile_s = elapsed if self.is_compiled else None  # None: it fell back to eager
        self._is_warm, self.num_steps = True, 0
        log.info("step %s in %.1f s", "compiled" if self.is_compiled else "run eagerly", elapsed)
        return elapsed

    # --- one step ---------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        if not plan.rows:
            return StepOutput((), ())
        if self._graphs is not None and all(len(r.token_ids) == 1 for r in plan.rows):
            output = self._execute_graphed(plan)
            if output is not None:
                return output
        after, before, sample_rows = self.logits(plan)
        tokens, logprobs = self.sampler.sample(after, before, sample_rows)
        self.num_steps += 1
        order = {r.row_id: i for i, r in enumerate(sample_rows)}
        in_plan_order = [order[r.row_id] for r in plan.rows if r.samples]
        return self._to_host(tokens, logprobs, sample_rows, in_plan_order)

    @torch.inference_mode()
    def logits(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, list[ScheduledRow]]:
        """Run the step's forward (writing its KV): the after and before logits [S, vocab] of
        its sampling rows, decoding rows first, and those rows in that order."""
        decoding = [r for r in plan.rows if len(r.token_ids) == 1]
        prefilling = [r for r in plan.rows if len(r.token_ids) > 1]
        sample_rows = [r for r in (*decoding, *prefilling) if r.samples]
        if self.lora is None:
            inputs, batch, sample_index = self._pack(decoding, prefilling)
        else:
            inputs, batch, sample_index = self._pack_lora(decoding, prefilling)
        index = upload(sample_index, torch.long, self.device)
        # Once both graphs exist, dynamo need only tell them apart: checking every guard (on
        # each model parameter) cost 0.8 ms a step. A step they do not cover raises.
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=self._is_warm):
            after, before = self._forward(inputs["input_ids"], inputs["position_ids"], index, batch)
        num_sampled = len(sample_rows)
        return after[:num_sampled], before[:num_sampled], sample_rows

    def _execute_graphed(self, plan: StepPlan) -> StepOutput | None:
        """A decode step by its bucket's graph: both models, and the sampler unless a row asks
        for log-probabilities (those are computed after the replay, from its logits). None
        where the graphs are full or a capture failed (the step then runs as usual)."""
        assert self._graphs is not None
        rows = list(plan.rows)
        sample_rows = [r for r in rows if r.samples]
        inputs, batch, sample_index = self._pack(rows, [])
        s = self.sampler.rows(sample_rows)
        # A sampler that may read the device back (sync_free off) cannot be recorded.
        samples_in_graph = s.scores is None and not self.native_sampler and s.plan.sync_free
        key = GraphKey(
            tokens=batch.decode_positions.shape[0],
            keys=batch.decode_read_index.shape[1],
            sampled=len(sample_index),
            plan=s.plan if samples_in_graph else None,
        )
        if not self._graphs.has_room(key):
            return None
        tensors = {
            "input_ids": inputs["input_ids"],
            "position_ids": inputs["position_ids"],
            "logits_index": upload(sample_index, torch.long, self.device),
            "write_index": batch.write_index,
            "decode_read_index": batch.decode_read_index,
            "decode_positions": batch.decode_positions,
        }
        if samples_in_graph:
            tensors.update(self.sampler.graph_inputs(s, sample_rows))
        try:
            outputs = self._graphs.run(key, tensors)
        except CaptureError:  # the server goes on without graphs, and says why
            log.exception("decode steps run without CUDA graphs from now on")
            self._graphs = self.sampler.graph_padding = None
            return None
        num_sampled = len(sample_rows)
        if samples_in_graph:
            tokens, logprobs = outputs[0][:num_sampled], None
        else:
            after, before = outputs[0][:num_sampled], outputs[1][:num_sampled]
            tokens, logprobs = self.sampler.sample(after, before, sample_rows)
        self.num_steps += 1
        return self._to_host(tokens, logprobs, sample_rows, list(range(num_sampled)))

    def _graphed_step(self, key: GraphKey) -> Step:
        """What a decode graph records, over its static tensors: the tokens the sampler draws
        (with a plan), or both models' logits of the sampled rows, copied into one buffer all
        graphs share: kept as each graph's own outputs, [rows, vocab] per graph would stay
        allocated in the pool for good."""
        plan = key.plan
        native_block_size = self.block_size if self.native_attention else 0
        arena = None if plan is not None else self._logits_arena(key.sampled)

        def step(t: Mapping[str, torch.Tensor]) -> Outputs:
            batch = PagedBatch(
                write_index=t["write_index"],
                decode_read_index=t["decode_read_index"],
                decode_positions=t["decode_positions"],
                prefill_read_index=None,
                prefill_spans=None,
                is_compiled=self.is_compiled,
                native_block_size=native_block_size,
            )
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=self._is_warm):
                after, before = self._forward(
                    t["input_ids"], t["position_ids"], t["logits_index"], batch
                )
            if arena is not None:
                rows = after.shape[0]
                arena[0, :rows].copy_(after)
                arena[1, :rows].copy_(before)
                return arena[0, :rows], arena[1, :rows]
            assert plan is not None
            tokens, _, _ = sample_step(
                after, before, t["alpha"], t["temperature"], t["top_p"], t["top_k"],
                t["uniforms"] if not plan.all_greedy else None, plan,
            )  # fmt: skip
            return (tokens,)

        return step

    def _logits_arena(self, rows: int) -> torch.Tensor:
        """[2, R, vocab] for the models-only graphs' logits (R >= rows), made before a capture;
        a larger one replaces it for later graphs (the earlier ones keep theirs)."""
        if self._arena is None or self._arena.shape[1] < rows:
            rows = max(rows, self._sampled_rows(self.config.max_batch_size))
            shape = (2, rows, self.vocab)
            # float32 whatever the models' dtype: the sampler and the log-probabilities
            # upcast to it anyway, so the copy loses nothing.
            self._arena = torch.empty(shape, dtype=torch.float32, device=self.device)
        return self._arena

    def _forward_eager(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        logits_index: torch.Tensor,
        batch: PagedBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models over the packed tokens; logits [S, vocab] of the tokens in logits_index
        (a LoRA pair: one forward over both copies; the index's first half is the before
        copies' tokens, its second half the after copies')."""
        if self.lora is not None:
            self.lora.tokens.set(batch.token_adapters, self.pair.dtype)
            out = self.pair.after(
                input_ids=input_ids, position_ids=position_ids, use_cache=False,
                logits_to_keep=logits_index, batchserve=PagedCall(self.stores[0], batch),
            )  # fmt: skip
            self.lora.tokens.set(None, self.pair.dtype)
            logits = out.logits[0, :, : self.vocab]
            half = logits.shape[0] // 2
            return logits[half:], logits[:half]
        outputs = []
        for model, store in zip((self.pair.after, self.pair.before), self.stores, strict=True):
            out = model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False,
                logits_to_keep=logits_index, batchserve=PagedCall(store, batch),
            )  # fmt: skip
            outputs.append(out.logits[0, :, : self.vocab])
        return outputs[0], outputs[1]

    def _adapters(self, row: ScheduledRow) -> tuple[int, int]:
        """The row's (after, before) adapter indices (BASE: the base alone)."""
        key = (row.params.after, row.params.before)
        found = self._adapter_index.get(key)
        if found is None:
            assert self.lora is not None
            found = (self.lora.index_of(key[0], 0), self.lora.index_of(key[1], BASE))
            self._adapter_index[key] = found
        return found

    def _pack_lora(
        self, decoding: list[ScheduledRow], prefilling: list[ScheduledRow]
    ) -> tuple[dict[str, torch.Tensor], PagedBatch, list[int]]:
        """Each row twice, as in `_pack`: its before copy (its own blocks, its before adapter
        or the base) then its after copy (blocks shifted by num_blocks, its after adapter).
        The logits index holds the before copies' sampled tokens, then the after copies'."""
        shift = self._num_blocks

        def copies(rows: list[ScheduledRow]) -> tuple[list[ScheduledRow], list[int]]:
            sides = [self._adapters(r) for r in rows]
            shifted = [
                dataclasses.replace(r, block_ids=tuple(b + shift for b in r.block_ids))
                for r in rows
            ]
            return [*rows, *shifted], [s[1] for s in sides] + [s[0] for s in sides]

        dec, dec_adapters = copies(decoding)
        pre, pre_adapters = copies(prefilling)
        inputs, batch, index = self._pack(dec, pre, dec_adapters + pre_adapters)
        num_dec = sum(r.samples for r in decoding)
        num_pre = sum(r.samples for r in prefilling)
        before = index[:num_dec] + index[2 * num_dec : 2 * num_dec + num_pre]
        after = (
            index[num_dec : 2 * num_dec] + index[2 * num_dec + num_pre : 2 * (num_dec + num_pre)]
        )
        padded = self._sampled_rows(len(before))
        index = before + [0] * (padded - len(before)) + after + [0] * (padded - len(after))
        return inputs, batch, index

    def _pack(
        self,
        decoding: list[ScheduledRow],
        prefilling: list[ScheduledRow],
        adapters: list[int] | None = None,
    ) -> tuple[dict[str, torch.Tensor], PagedBatch, list[int]]:
        """Host lists -> the step's input tensors (one host-to-device copy each); `adapters`
        (a LoRA pair): each row's adapter index, decoding rows then prefilling rows.

        Packed order: one query per decoding row, then (with the C attention) each short
        chunk's tokens as queries of their own (causal by their positions), padding, then the
        other chunks' tokens (attended per chunk by `prefill_attention`), padding."""
        bs = self.block_size
        rows = [*decoding, *prefilling]
        row_adapters = adapters or [BASE] * len(rows)
        as_query = [i < len(decoding) or self._rides_as_queries(r) for i, r in enumerate(rows)]
        queries = [i for i, q in enumerate(as_query) if q]
        chunked = [i for i, q in enumerate(as_query) if not q]
        ids: list[int] = []
        positions: list[int] = []
        write: list[int] = []
        token_adapters: list[int] = []
        last_token = [0] * len(rows)  # each row's last token's place in the packing
        query_tables: list[Sequence[int]] = []
        query_lengths: list[int] = []
        for i in queries:
            r = rows[i]
            for p, token in enumerate(r.token_ids, start=r.start):
                ids.append(token)
                positions.append(p)
                write.append(r.block_ids[p // bs] * bs + p % bs)
                token_adapters.append(row_adapters[i])
                query_tables.append(r.block_ids)
                query_lengths.append(p + 1)
            last_token[i] = len(ids) - 1
        num_decode = bucket(len(ids), self._row_step)
        pad = num_decode - len(ids)
        ids += [0] * pad
        positions += [0] * pad
        write += [0] * pad
        token_adapters += [BASE] * pad
        spans: list[tuple[int, int, int]] = []
        offset = 0
        for i in chunked:
            r = rows[i]
            n = len(r.token_ids)
            spans.append((offset, n, r.start))
            ids.extend(r.token_ids)
            positions.extend(range(r.start, r.start + n))
            write.extend(r.block_ids[p // bs] * bs + p % bs for p in range(r.start, r.start + n))
            token_adapters += [row_adapters[i]] * n
            offset += n
            last_token[i] = num_decode + offset - 1
        if chunked:
            pad = bucket(offset, self._token_step) - offset
            ids += [0] * pad
            positions += [0] * pad
            write += [0] * pad
            token_adapters += [BASE] * pad
        spans += [(0, 0, 0)] * (_MIN_SIZE - len(spans))
        sample_index = [last_token[i] for i, r in enumerate(rows) if r.samples]
        sample_index += [0] * (self._sampled_rows(len(sample_index)) - len(sample_index))
        dev = self.device
        if self.native_attention:
            table = self._block_table(query_tables, query_lengths, num_decode)[0]
            decode_read = upload(table, torch.long, dev)
        else:
            decode_read = self._read_index(query_tables, query_lengths, num_decode)
        prefill_read = None
        if chunked:
            prefill_read = self._read_index(
                [rows[i].block_ids for i in chunked],
                [rows[i].start + len(rows[i].token_ids) for i in chunked],
                len(spans),
            )
        batch = PagedBatch(
            write_index=upload(write, torch.long, dev),
            decode_read_index=decode_read,
            decode_positions=upload(positions[:num_decode], torch.long, dev),
            prefill_read_index=prefill_read,
            prefill_spans=torch.tensor(spans, dtype=torch.long) if chunked else None,
            is_compiled=self.is_compiled,
            native_block_size=bs if self.native_attention else 0,
            token_adapters=(
                None if adapters is None
                else upload(token_adapters, torch.long, dev)
            ),
        )  # fmt: skip
        inputs = {
            "input_ids": upload([ids], torch.long, dev),
            "position_ids": upload([positions], torch.long, dev),
        }
        return inputs, batch, sample_index

    def _sampled_rows(self, n: int) -> int:
        """The padded count of n sampled rows (the logits kept)."""
        return bucket(n, self._row_step)

    def _rides_as_queries(self, row: ScheduledRow) -> bool:
        """Whether a prompt chunk goes through the C attention as one query per token: where
        its keys read in all (n tokens x up to start + n keys) stay few. Decided by the row
        alone, so a row is attended the same way whatever else shares its step."""
        n = len(row.token_ids)
        return self.native_attention and n > 1 and n * (row.start + n) <= _SHORT_CHUNK_READS

    def _block_table(
        self, tables: Sequence[Sequence[int]], lengths: Sequence[int], num_rows: int
    ) -> tuple[torch.Tensor, int]:
        """[num_rows, W] block tables on the host, each cut or padded (with the reserved block
        0) to the W blocks of L positions (L: the longest length, bucketed), and L."""
        bs = self.block_size
        longest = max(lengths, default=1)
        if self._graphs is None:
            length = bucket(longest, max(16, bs))
        else:  # few widths, so few graphs: powers of two from 64
            length = max(64, bs, 1 << (longest - 1).bit_length())
        num_blocks = max(_MIN_SIZE, math.ceil(length / bs))
        # One tensor from padded lists: a tensor and a copy per row cost ~8 us a row a step.
        padded = [[*blocks[:num_blocks], *[0] * (num_blocks - len(blocks))] for blocks in tables]
        padded += [[0] * num_blocks] * (num_rows - len(padded))
        return torch.tensor(padded, dtype=torch.long).reshape(num_rows, num_blocks), length

    def _read_index(
        self, tables: Sequence[Sequence[int]], lengths: Sequence[int], num_rows: int
    ) -> torch.Tensor:
        """[num_rows, L] store slots of each row's positions 0..L-1; padding rows and positions
        past a table read block 0."""
        bs = self.block_size
        table, length = self._block_table(tables, lengths, num_rows)
        positions = torch.arange(length)
        return upload(table[:, positions // bs] * bs + positions % bs, torch.long, self.device)

    # --- the step's output -------------------------------------------------------------------

    def _to_host(
        self,
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
        rows: list[ScheduledRow],
        order: list[int],
    ) -> StepOutput:
        """The step's one device-to-host copy: tokens, and log-probabilities beside them (a
        float64 column holds any token id exactly)."""
        self.num_host_transfers += 1
        if logprobs is None:
            host_tokens = tokens.tolist()
            return StepOutput(
                tuple(rows[i].row_id for i in order), tuple(host_tokens[i] for i in order)
            )
        table = torch.cat([tokens.double()[:, None], logprobs.double()], dim=1).tolist()
        row_ids, token_ids, entries = [], [], []
        for i in order:
            row = rows[i]
            row_ids.append(row.row_id)
            token_ids.append(int(table[i][0]))
            width = 3 + len(row.params.score_alphas)
            entries.append(tuple(table[i][1 : 1 + width]) if row.params.wants_logprobs else None)
        return StepOutput(tuple(row_ids), tuple(token_ids), tuple(entries))
