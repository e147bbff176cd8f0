"""The GPU 2:4 kernels lowbit uses (torch's own), how a weight is prepared for them, and which
path a call takes.

* cuSPARSELt (KernelChoice.TORCH): `torch._cslt_compress` packs values + metadata into one
  opaque buffer; `torch._cslt_sparse_mm(packed, x.t(), ...)` computes W @ x^T. fp16/bf16 in and
  out; int8 in with int32/fp16/bf16 out and an optional per-output-row float32 `alpha` vector
  (our per-row weight scale, fused into the epilogue). Runs on sm80 and newer, H100 included.
* CUTLASS (KernelChoice.CUTLASS): `torch._sparse_semi_structured_mm(values, meta, x.t())`, with
  torch's CUTLASS metadata layout. torch builds these kernels for compute capability 8.x only
  ("Supported only on GPUs with compute capability 8.x"), so on H100 this path is unavailable.

Shape minimums are torch's (`SparseSemiStructuredTensor*._DTYPE_SHAPE_CONSTRAINTS`): the
sparse operand (N, K) must be a multiple of (16, 16) for fp16/bf16 and (32, 32) for int8 with
cuSPARSELt; (32, 64) and (16, 128) with CUTLASS. The dense operand's token count is padded
here (see pad_tokens), so any token count works.

These runtime forms are rebuilt from the stored layout on the device and never saved: the
cuSPARSELt layout is opaque and may change with the library version or GPU.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lowbit.core.kernel_choice import KernelChoice
from lowbit.formats.common import warn_once

CUSPARSELT = "cusparselt"
CUTLASS = "cutlass"

# (N multiple, K multiple) of the sparse operand, from torch's shape constraints.
CUSPARSELT_SHAPES = {16: (16, 16), 8: (32, 32)}  # keyed by element bits
CUTLASS_SHAPES = {16: (32, 64), 8: (16, 128)}
# Token padding of the dense operand: torch's dense minimums are 8 (16-bit) and 16 (8-bit);
# 8-bit cuSPARSELt GEMMs below 32 tokens have been reported to fail (PyTorch 2.11 on sm120),
# so 8-bit inputs are also padded to at least 32 tokens (the cost is nil at those sizes).
PAD_MULTIPLE = {16: 8, 8: 16}
PAD_FLOOR = {16: 16, 8: 32}

# NOTE: below these token counts (product of x's leading dims) AUTO on CUDA runs the dense path
# (the weight decompressed per call, then cuBLAS bf16 / torch._int_mm) instead of the 2:4 kernel.
# They are the M from which `python benchmarks/bench_sparsity.py --speed` measures the 2:4 kernel
# beating that dense path (it prints them). H100, cuSPARSELt alg 0 (before the algorithm search):
# 11008x4096 bf16 2:4 vs dense path 112 vs 586 us at M=1, 81 vs 594 at M=128, 834 vs 828 at M=2048
# (alg 0's worst case; the search is expected to fix it); int8 55 vs 626 us at M=1. So 0: always
# the 2:4 kernel. Whether 2:4 beats a dense *model* is decided at conversion (speed.py, faster_at).
SEMI_SPARSE_MIN_TOKENS = 0
INT8_SEMI_SPARSE_MIN_TOKENS = 0


class Path(str, enum.Enum):
    """What one call runs."""

    CUSPARSELT = "cusparselt"  # 2:4 tensor cores via cuSPARSELt
    CUTLASS = "cutlass"  # 2:4 tensor cores via torch's CUTLASS kernels (sm8x)
    DENSE = "dense"  # decompress, then the dense GPU GEMM (cuBLAS / torch._int_mm)
    REFERENCE = "reference"  # decompress, then the pure-PyTorch reference math (any device)


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def shape_reason(n: int, k: int, shapes: tuple[int, int], what: str) -> str | None:
    mn, mk = shapes
    if n % mn or k % mk:
        return f"{what} needs N % {mn} == 0 and K % {mk} == 0, got N={n}, K={k}"
    return None


def unavailable_reason(backend: str, dtype: torch.dtype, device: torch.device, n: int, k: int) -> str | None:
    """Why `backend` cannot run a 2:4 weight of this dtype/shape on `device` (None: it can)."""
    if device.type != "cuda":
        return f"{backend} needs a CUDA weight, this one is on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16, torch.int8):
        return f"{backend} 2:4 kernels take fp16/bf16/int8 values, not {dtype}"
    bits = _bits(dtype)
    if backend == CUSPARSELT:
        if not torch.backends.cusparselt.is_available():
            return "this torch build has no cuSPARSELt"
        return shape_reason(n, k, CUSPARSELT_SHAPES[bits], "cuSPARSELt")
    if torch.cuda.get_device_capability(device)[0] != 8:
        return "torch's CUTLASS 2:4 kernels run only on compute capability 8.x"
    return shape_reason(n, k, CUTLASS_SHAPES[bits], "CUTLASS 2:4")


def wanted_backends(kernel: KernelChoice) -> tuple[str, ...]:
    """The backends a weight prepares for, in preference order."""
    if kernel is KernelChoice.TORCH:
        return (CUSPARSELT,)
    if kernel is KernelChoice.CUTLASS:
        return (CUTLASS,)
    if kernel is KernelChoice.AUTO:
        return (CUSPARSELT, CUTLASS)
    return ()


def pack_for(backend: str, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The runtime form of a dense 2:4 CUDA weight: (cuSPARSELt buffer, None) or (values, meta)."""
    dense = dense.contiguous()
    if backend == CUSPARSELT:
        return torch._cslt_compress(dense), None
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    values, meta = sparse_semi_structured_from_dense_cutlass(dense)
    return values, meta


def choose_path(
    choice: KernelChoice, on_cuda: bool, tokens: int, min_tokens: int, backend: str | None
) -> Path | str:
    """The one place a 2:4 weight's KernelChoice becomes a path.

    Returns a Path, or the name of the backend an explicit choice needs but the weight could
    not prepare (the caller raises, naming the reason). AUTO: the reference off CUDA; on CUDA
    the prepared 2:4 backend from `min_tokens` tokens on, the dense path below it (or when no
    backend could be prepared; the caller warns once).
    """
    if choice is KernelChoice.REFERENCE:
        return Path.REFERENCE
    if choice is KernelChoice.TORCH:
        return Path.CUSPARSELT if backend == CUSPARSELT else CUSPARSELT
    if choice is KernelChoice.CUTLASS:
        return Path.CUTLASS if backend == CUTLASS else CUTLASS
    if choice is not KernelChoice.AUTO:
        return choice.value
    if not on_cuda:
        return Path.REFERENCE
    if backend is None or tokens < min_tokens:
        return Path.DENSE
    return Path(backend)


def pad_tokens(x2: torch.Tensor) -> torch.Tensor:
    """Pad (M, K) with zero rows to the dense operand's multiple (and floor) for x2's dtype."""
    bits = _bits(x2.dtype)
    mult, floor = PAD_MULTIPLE[bits], PAD_FLOOR[bits]
    m = x2.shape[0]
    target = max(floor, -(-m // mult) * mult)
    return F.pad(x2, (0, 0, 0, target - m)) if target != m else x2


# ---------------------------------------------------------------------------------------------
# cuSPARSELt algorithm selection
# ---------------------------------------------------------------------------------------------
# NOTE: with cuSPARSELt's default algorithm (alg_id 0) 2:4 bf16 lost to dense cuBLAS on H100 even
# where it has half the work: 11008x4096, M=1: 111 vs 47 us (the alg-0 run of benchmarks/results/
# sparsity_speed_a87b482_h100.json). cuSPARSELt's own search (cusparseLtMatmulSearch) fixes most
# of that, so its pick is always a candidate; lowbit also times alg ids 0..SEARCH_ALG_IDS-1 (default
# split-K) on the real operands and keeps the fastest: in the graph-replayed H100 run
# (results/sparsity_speed_h100.json, 40 rows) cuSPARSELt's pick won 36 times, an id 0-5 four times
# (e.g. 11008x4096 bf16 M=2048: alg 1, 178 us). Once per (device, N, K, token bucket, dtypes,
# epilogue, layout), lazily on the first eager GPU call, cached for the process.
SEARCH_ENV = "LOWBIT_CUSPARSELT_SEARCH"  # "0": never search, always cuSPARSELt's default algorithm
MAX_TOKEN_BUCKET = 1 << 16
SEARCH_ALG_IDS = 6
SEARCH_REPS = 5
# NOTE: the result layout (results/probe_cslt_m2048_h100.json, graph replays, best alg id 0-5 of
# each layout): from 1024 tokens an (N, M) result, returned as an (M, N) transposed view, beat
# asking cuSPARSELt for (M, N): 11008x4096 M=1024 93 vs 139 us, M=2048 182 vs 256, M=8192 768 vs
# 1004; 4096x11008 M=2048 203 vs 266, M=8192 738 vs 1060. Smaller token counts keep the (M, N)
# row-major result (not compared there).
NM_RESULT_MIN_TOKENS = 1024


class CsltAlgo(NamedTuple):
    """One cuSPARSELt plan choice (the arguments `torch._cslt_sparse_mm` takes)."""

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int = -1


class AlgoKey(NamedTuple):
    device: int
    n: int
    k: int
    tokens: int  # the token bucket (see token_bucket)
    dtype: torch.dtype
    out_dtype: torch.dtype | None
    alpha: bool
    bias: bool
    transpose_result: bool
    dense_contiguous: bool


DEFAULT_ALGO = CsltAlgo()
_ALGOS: dict[AlgoKey, CsltAlgo] = {}


def env_enabled(value: str | None) -> bool:
    """The search setting $LOWBIT_CUSPARSELT_SEARCH asks for (unset: on)."""
    return (value or "1").strip().lower() not in ("0", "false", "off", "no")


_search_enabled = env_enabled(os.environ.get(SEARCH_ENV))


def set_algorithm_search(enabled: bool) -> bool:
    """Turn the cuSPARSELt algorithm search on or off (default on; env LOWBIT_CUSPARSELT_SEARCH=0
    turns it off). Off: every call runs cuSPARSELt's default algorithm. Returns the old setting."""
    global _search_enabled
    old, _search_enabled = _search_enabled, bool(enabled)
    return old


@contextlib.contextmanager
def algorithm_search(enabled: bool) -> Iterator[None]:
    """`with algorithm_search(False): ...` runs the block with the search on or off."""
    old = set_algorithm_search(enabled)
    try:
        yield
    finally:
        set_algorithm_search(old)


def algorithm_cache() -> dict[AlgoKey, CsltAlgo]:
    """A copy of the algorithms found so far."""
    return dict(_ALGOS)


def clear_algorithm_cache() -> None:
    _ALGOS.clear()


def token_bucket(m: int) -> int:
    """Token counts that share one searched algorithm: the next power of two (at most 2**16)."""
    return min(MAX_TOKEN_BUCKET, 1 << max(0, m - 1).bit_length())


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def _can_search(dense_b: torch.Tensor) -> bool:
    """Searching times kernels and synchronizes: never while torch.compile traces or a CUDA
    graph captures (the caller then runs a cached choice or the default)."""
    if torch.compiler.is_compiling() or not _on_gpu(dense_b):
        return False
    return not torch.cuda.is_current_stream_capturing()


def _library_search(packed, dense_b, bias, alpha, out_dtype, transpose_result) -> CsltAlgo:
    """cuSPARSELt's search through whichever entry point this torch has: torch._C._cusparselt.
    mm_search -> (alg_id, split_k, split_k_mode, max_alg_id); torch._cslt_sparse_mm_search -> an
    int (older builds: a tuple whose first item is the alg id)."""
    mod = getattr(torch._C, "_cusparselt", None)
    fn = getattr(mod, "mm_search", None)
    if fn is not None:
        found = fn(packed, dense_b, bias, alpha, out_dtype, transpose_result)
    else:
        found = torch._cslt_sparse_mm_search(
            packed, dense_b, bias=bias, alpha=alpha, out_dtype=out_dtype, transpose_result=transpose_result
        )
    if isinstance(found, (tuple, list)):
        if fn is not None and len(found) >= 3:
            return CsltAlgo(int(found[0]), int(found[1]), int(found[2]))
        return CsltAlgo(int(found[0]))
    return CsltAlgo(int(found))


def _time_us(fn) -> float:
    """Median GPU time of fn (one warm-up call first). A GPU sleep ahead of each timed call (about
    2.5 ms at H100 clocks) keeps the host's per-call plan set-up (up to ~1.2 ms for cuSPARSELt)
    out of the interval."""
    fn()
    if not torch.cuda.is_available():  # the CPU stand-ins of the tests
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    times = []
    for _ in range(SEARCH_REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(5_000_000)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def _search(packed, dense_b, bias, alpha, out_dtype, transpose_result) -> CsltAlgo:
    """Time cuSPARSELt's own pick and alg ids 0..SEARCH_ALG_IDS-1 (default split-K) on the real
    operands; the fastest that runs. RuntimeError when none does."""
    candidates: list[CsltAlgo] = []
    try:
        candidates.append(_library_search(packed, dense_b, bias, alpha, out_dtype, transpose_result))
    except RuntimeError:
        pass
    candidates += [CsltAlgo(i) for i in range(SEARCH_ALG_IDS) if CsltAlgo(i) not in candidates]
    best: tuple[float, CsltAlgo] | None = None
    error: RuntimeError | None = None
    for algo in candidates:
        kwargs = _mm_kwargs(algo)
        try:
            us = _time_us(lambda kw=kwargs: torch._cslt_sparse_mm(
                packed, dense_b, bias=bias, alpha=alpha, out_dtype=out_dtype,
                transpose_result=transpose_result, **kw))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # an id past this problem's algorithms, an unsupported plan
            error = error or e
            continue
        if best is None or us < best[0]:
            best = (us, algo)
    if best is None:
        raise error or RuntimeError("no cuSPARSELt algorithm ran")
    return best[1]


def _mm_kwargs(algo: CsltAlgo) -> dict[str, int]:
    """The plan arguments this torch's `_cslt_sparse_mm` takes (alg 0 passes none: the defaults)."""
    if algo == DEFAULT_ALGO:
        return {}
    names = _mm_arg_names()
    out = {"alg_id": algo.alg_id}
    if algo.split_k != 1 and "split_k" in names:
        out["split_k"] = algo.split_k
        if "split_k_mode" in names:
            out["split_k_mode"] = algo.split_k_mode
    return out


@functools.cache
def _mm_arg_names() -> frozenset[str]:
    try:
        return frozenset(a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments)
    except (AttributeError, RuntimeError):
        return frozenset({"alg_id"})


def choose_algorithm(
    packed: torch.Tensor,
    dense_b: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    transpose_result: bool,
) -> CsltAlgo:
    """The algorithm for this call: cached, else searched now (eager GPU calls only), else alg 0.
    A failed search is cached as alg 0 (warned once) so it is not retried every call."""
    if not _search_enabled:
        return DEFAULT_ALGO
    tokens = dense_b.shape[1]
    if not isinstance(tokens, int):  # a symbolic size under torch.compile: no bucket to look up
        return DEFAULT_ALGO
    key = AlgoKey(
        (dense_b.device.index or 0) if _on_gpu(dense_b) else -1,
        packed.shape[0],
        dense_b.shape[0],
        token_bucket(tokens),
        dense_b.dtype,
        out_dtype,
        alpha is not None,
        bias is not None,
        transpose_result,
        dense_b.is_contiguous(),
    )
    algo = _ALGOS.get(key)
    if algo is not None or not _can_search(dense_b):
        return algo or DEFAULT_ALGO
    try:
        algo = _search(packed, dense_b, bias, alpha, out_dtype, transpose_result)
    except RuntimeError as e:  # e.g. a cuSPARSELt without search support for this problem
        warn_once(
            f"cslt-search-{e}",
            f"cuSPARSELt algorithm search failed ({str(e).splitlines()[0]}); using the default algorithm",
        )
        algo = DEFAULT_ALGO
    _ALGOS[key] = algo
    return algo


def cusparselt_mm(
    packed: torch.Tensor,
    x2: torch.Tensor,
    bias: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    transpose_result: bool | None = None,
    contiguous_dense: bool = False,
) -> torch.Tensor:
    """x2 (M, K) @ W^T -> (M, N), with the cached/searched cuSPARSELt algorithm.

    The dense operand is x^T as a transposed view (no copy; cuSPARSELt reads it as a transposed
    row-major matrix). The result: below NM_RESULT_MIN_TOKENS (padded) tokens it is asked for
    transposed, so it comes out as (M, N) row-major; from there on cuSPARSELt writes (N, M) and
    the caller gets its (M, N) transposed view (faster, see the NOTE). transpose_result forces one
    of the two; `contiguous_dense=True` (x^T copied first) exists for the benchmark.
    """
    m = x2.shape[0]
    xp = pad_tokens(x2)
    if xp.stride(-1) != 1 and _bits(xp.dtype) == 8:
        # e.g. the (M, N) view an earlier 2:4 layer returned: x^T would be contiguous, which
        # cuSPARSELt's 8-bit GEMMs reject ("operation not supported"); 16-bit ones take it
        xp = xp.contiguous()
    if transpose_result is None:  # (a guard under torch.compile with dynamic shapes)
        transpose_result = not bool(xp.shape[0] >= NM_RESULT_MIN_TOKENS)
    dense_b = xp.t().contiguous() if contiguous_dense else xp.t()
    algo = choose_algorithm(packed, dense_b, bias, alpha, out_dtype, transpose_result)
    y = torch._cslt_sparse_mm(
        packed,
        dense_b,
        bias=bias,
        alpha=alpha,
        out_dtype=out_dtype,
        transpose_result=transpose_result,
        **_mm_kwargs(algo),
    )
    return y[:m] if transpose_result else y.t()[:m]


def cutlass_mm(
    values: torch.Tensor, meta: torch.Tensor, x2: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x2 (M, K) @ W^T -> (M, N) with torch's CUTLASS 2:4 kernel (it computes W @ x^T)."""
    m = x2.shape[0]
    xp = pad_tokens(x2)
    y = torch._sparse_semi_structured_mm(values, meta, xp.t(), out_dtype=out_dtype)
    return y[:, :m].t()
