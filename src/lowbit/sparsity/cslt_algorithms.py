"""Which cuSPARSELt algorithm a 2:4 GEMM runs: timed once per problem, cached for the process.

`backends.cusparselt_mm` asks `choose_algorithm` for every call. The public switches
(`set_algorithm_search`, `algorithm_search`, `algorithm_cache`, ...) are re-exported by
`lowbit.sparsity.backends`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch

from lowbit.formats.common import warn_once

# NOTE: with cuSPARSELt's default algorithm (alg_id 0) 2:4 bf16 lost to dense cuBLAS on H100 even
# where it has half the work: 11008x4096, M=1: 111 vs 47 us (the alg-0 run of benchmarks/results/
# sparsity_speed_a87b482_h100.json). cuSPARSELt's own search (cusparseLtMatmulSearch) fixes most
# of that, so its pick is always a candidate; lowbit also times alg ids 0..SEARCH_ALG_IDS-1 (default
# split-K) on the real operands and keeps the fastest: in the graph-replayed H100 run
# (results/sparsity_speed_h100.json, 40 rows) cuSPARSELt's pick won 37 times, an id 0-5 three
# times (e.g. 11008x4096 bf16 M=2048: alg 1, 177 us). Once per (device, N, K, token bucket, dtypes,
# epilogue, layout), lazily on the first eager GPU call, cached for the process.
SEARCH_ENV = "LOWBIT_CUSPARSELT_SEARCH"  # "0": never search, always cuSPARSELt's default algorithm
MAX_TOKEN_BUCKET = 1 << 16
SEARCH_ALG_IDS = 6
SEARCH_REPS = 5


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
        kwargs = mm_kwargs(algo)
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


def mm_kwargs(algo: CsltAlgo) -> dict[str, int]:
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
