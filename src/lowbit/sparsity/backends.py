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
cuSPARSELt layout is opaque and may change with the library version or GPU. Which cuSPARSELt
algorithm a call runs is chosen in cslt_algorithms.py (its switches are re-exported here).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from lowbit.core.kernel_choice import KernelChoice
from lowbit.sparsity.cslt_algorithms import (  # noqa: F401  (re-exported: the public switches)
    DEFAULT_ALGO,
    SEARCH_ENV,
    AlgoKey,
    CsltAlgo,
    algorithm_cache,
    algorithm_search,
    choose_algorithm,
    clear_algorithm_cache,
    env_enabled,
    mm_kwargs,
    set_algorithm_search,
    token_bucket,
)

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
# cuSPARSELt GEMM (the algorithm choice: cslt_algorithms.py)
# ---------------------------------------------------------------------------------------------
# NOTE: the result layout (results/probe_cslt_m2048_h100.json, graph replays, best alg id 0-5 of
# each layout): from 1024 tokens an (N, M) result, returned as an (M, N) transposed view, beat
# asking cuSPARSELt for (M, N): 11008x4096 M=1024 93 vs 139 us, M=2048 182 vs 256, M=8192 768 vs
# 1004; 4096x11008 M=2048 203 vs 266, M=8192 738 vs 1060. Smaller token counts keep the (M, N)
# row-major result (not compared there).
NM_RESULT_MIN_TOKENS = 1024


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
        **mm_kwargs(algo),
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
