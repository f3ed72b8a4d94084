"""The CPU kernels in C (csrc/), built once per machine: the decode attention and the sampler.

Why C for the attention: profiled on the toy pair, a 32-row decode step spent half its time in
attention. Inductor's fused kernel reads the keys in place but spends its time on a softmax
over a strided axis and a horizontal sum per score. The C kernel reads each row's own keys once
(not up to the batch's longest row), softmaxes contiguous scores and specialises the head size:
with the keys in cache 2-3x faster than the fused kernel (32 rows of ~110 keys: ~200 vs
~450 us), and ~1.4x inside a served step, where reading the store from memory sets the pace. A
torch custom op wraps it, so a compiled step calls it as one opaque kernel.

Why C for the sampler: the torch sampler is ~100 small operations a step (amplify, softmax,
top-k and nucleus masks, the CDF), 15% of a lone request's step; `sample_rows` does the same
per row in one pass (csrc/sample_rows.c), called eagerly after the forward.

Neither includes a torch header, so the C compiler (the one torch.compile already needs on the
CPU) builds each in well under a second, and ctypes loads it. The builds are cached under
$XDG_CACHE_HOME/batchserve (by default ~/.cache/batchserve), keyed by the sources, the compiler
and this CPU's flags. Where no compiler works, the runner keeps torch's versions. The runner
decides where to use them (`--native-attention`, `--native-sampler`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
_FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC")
_NATIVE_CPU = ("-march=native",)  # retried without it where the compiler refuses it
# Each library's own flags. The sampler's sums and products must round as torch's separate
# operations do (after + alpha * (after - before) bit for bit), so no fused multiply-adds.
_LIBRARIES = {"decode_attention": (), "sample_rows": ("-ffp-contract=off",)}
_WHAT = {"decode_attention": "decode attention", "sample_rows": "sampler"}
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchserve"


def _build(compiler: list[str], name: str = "decode_attention") -> Path:
    """csrc/<name>.c as a shared library, compiled unless these sources (the file and the
    headers it may include), compiler and CPU already have one."""
    source = CSRC / f"{name}.c"
    flags = (*_FLAGS, *_LIBRARIES[name])
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    texts = [source.read_text(), *(h.read_text() for h in sorted(CSRC.glob("*.h")))]
    key = hashlib.sha256(
        b"\0".join(s.encode() for s in (*texts, *compiler, version, _cpu_flags(), *flags))
    ).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private name, then an atomic rename: processes building at once never load a half file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for extra in (_NATIVE_CPU, ()):
            command = [*compiler, *flags, *extra, str(source), "-o", partial]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[:500]}")
        os.chmod(partial, 0o755)  # mkstemp made it private; a shared cache must load it
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def compiler() -> list[str]:
    """$CC (split as a shell would), else cc or gcc from the PATH; [] where none is."""
    return shlex.split(os.environ.get("CC", "")) or [
        c for c in (shutil.which("cc") or shutil.which("gcc"),) if c
    ]


@functools.cache
def _library(name: str) -> ctypes.CDLL | None:
    compiler_command = compiler()
    try:
        if not compiler_command:
            raise RuntimeError("no C compiler (cc, gcc or $CC) on the PATH")
        return ctypes.CDLL(str(_build(compiler_command, name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("the C %s is unavailable (%s); using torch's", _WHAT[name], err)
        return None


def _bind(name: str, symbol: str, argtypes: list[type]) -> ctypes._CFuncPtr | None:
    """`symbol` of the library csrc/<name>.c (an int-returning C function), or None."""
    library = _library(name)
    if library is None:
        return None
    function = getattr(library, symbol)
    function.restype = ctypes.c_int
    function.argtypes = argtypes
    return function


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:
    return _bind(
        "decode_attention", "batchserve_decode_attention",
        [_PTR] * 6 + [_I64] * 6 + [ctypes.c_float, _I64, _PTR, _PTR, _I64],
    )  # fmt: skip


@functools.cache
def _sampler() -> ctypes._CFuncPtr | None:
    return _bind(
        "sample_rows", "batchserve_sample_rows",
        [_PTR, _PTR, _I64, _I64, _I64] + [_PTR] * 5 + [ctypes.c_float, _I64] + [_PTR] * 4,
    )  # fmt: skip


def available() -> bool:
    """Whether the C decode attention is built and loaded (the first call builds it)."""
    return _kernel() is not None


def sampler_available() -> bool:
    """Whether the C sampler is built and loaded (the first call builds it)."""
    return _sampler() is not None


class SampledRows(NamedTuple):
    tokens: torch.Tensor  # [rows] int64; `invalid` for a broken row
    amplified: torch.Tensor  # [rows, vocab] float32: after + alpha * (after - before), NaN -inf
    kept: torch.Tensor | None  # [rows, vocab] the kept probabilities, when asked for


def sample_rows(
    after: torch.Tensor,
    before: torch.Tensor,
    alpha: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    uniforms: list[float],
    greedy_below: float,
    invalid: int,
    want_kept: bool,
) -> SampledRows:
    """worker/sampling.py's program for float32 CPU logits [rows, vocab] in one C pass per row:
    the tokens, the amplified logits and (`want_kept`) `sampling.kept_probs`' tensor, which
    the log-probabilities read. Parameters are [rows] tensors; uniforms one float per row."""
    kernel = _sampler()
    if kernel is None:
        raise RuntimeError("the C sampler is not available")
    rows, vocab = after.shape
    if before.shape != after.shape or after.dtype != torch.float32 or before.dtype != after.dtype:
        raise TypeError("the C sampler reads two float32 [rows, vocab] logit tensors alike")
    if after.device.type != "cpu" or before.device.type != "cpu":
        raise TypeError("the C sampler reads CPU tensors")
    if after.stride(1) != 1 or before.stride() != after.stride():
        after, before = after.contiguous(), before.contiguous()
    columns = [
        alpha.float().contiguous(),
        temperature.float().contiguous(),
        top_p.float().contiguous(),
        top_k.long().contiguous(),
        torch.tensor(uniforms, dtype=torch.float64),
    ]
    if any(c.shape != (rows,) for c in columns):
        raise ValueError("one alpha, temperature, top_p, top_k and uniform per row")
    tokens = torch.empty(rows, dtype=torch.long)
    amplified = torch.empty(rows, vocab, dtype=torch.float32)
    kept = torch.empty(rows, vocab, dtype=torch.float32) if want_kept else None
    scratch = torch.empty(3 * vocab, dtype=torch.int32)
    kernel(
        after.data_ptr(), before.data_ptr(), rows, vocab, after.stride(0),
        *(c.data_ptr() for c in columns), greedy_below, invalid, amplified.data_ptr(),
        kept.data_ptr() if kept is not None else None, tokens.data_ptr(), scratch.data_ptr(),
    )  # fmt: skip
    return SampledRows(tokens, amplified, kept)


# The op is defined with the plain Library API, its kernel registered for the CPU only:
# `torch.library.custom_op`'s Python wrapper (autograd and schema checks) cost ~15 us of the
# ~30 us a call took, eight calls a step; the step runs in inference mode and never needs a
# backward. The fake kernel below lets torch.compile trace it.
_LIBRARY = torch.library.Library("batchserve", "FRAGMENT")
_LIBRARY.define(
    "native_decode_attention(Tensor query, Tensor key_store, Tensor value_store, "
    "Tensor block_table, Tensor positions, int block_size, float scale, int window) -> Tensor"
)


def native_decode_attention(
    query: torch.Tensor,
    key_store: torch.Tensor,
    value_store: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    scale: float,
    window: int,
) -> torch.Tensor:
    """query [B, heads, dim] float32 against the store rows its block table [B, W] names, keys
    0..positions[b] (the last `window` of them when window > 0) -> [B, heads, dim]."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the C decode attention is not available")
    _check_inputs(query, key_store, value_store, block_table, positions)
    query = query.contiguous()
    block_table = block_table.contiguous()
    positions = positions.contiguous()
    rows, heads, dim = query.shape
    out = torch.empty_like(query)
    max_keys = block_table.shape[1] * block_size
    scores = torch.empty(heads * max_keys, dtype=torch.float32)
    slots = torch.empty(max_keys, dtype=torch.long)
    status = kernel(
        query.data_ptr(), key_store.data_ptr(), value_store.data_ptr(), block_table.data_ptr(),
        positions.data_ptr(), out.data_ptr(), rows, heads, key_store.shape[1], dim,
        block_table.shape[1], block_size, scale, window, scores.data_ptr(), slots.data_ptr(),
        max_keys,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError("a decode row reads past its block table")
    return out


def _check_inputs(
    query: torch.Tensor,
    key_store: torch.Tensor,
    value_store: torch.Tensor,
    block_table: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """What the C code assumes and cannot check itself (it reads raw pointers)."""
    if not all(t.dtype == torch.float32 for t in (query, key_store, value_store)):
        raise TypeError("the C decode attention reads float32 queries and stores")
    if block_table.dtype != torch.int64 or positions.dtype != torch.int64:
        raise TypeError("block tables and positions must be int64")
    if not (key_store.is_contiguous() and value_store.is_contiguous()):
        raise ValueError("the KV stores must be contiguous [slots, kv_heads, dim]")
    rows, heads, dim = query.shape
    if value_store.shape != key_store.shape or key_store.shape[2] != dim:
        raise ValueError("keys, values and queries must share one head size")
    if heads % key_store.shape[1]:
        raise ValueError(f"{heads} query heads do not group over {key_store.shape[1]} KV heads")
    if block_table.shape[0] != rows or positions.shape != (rows,):
        raise ValueError("one block table and one position per query row")


_LIBRARY.impl("native_decode_attention", native_decode_attention, "CPU")


@torch.library.register_fake("batchserve::native_decode_attention")
def _(query, key_store, value_store, block_table, positions, block_size, scale, window):  # noqa: ANN001, ANN202
    return torch.empty_like(query, memory_format=torch.contiguous_format)
