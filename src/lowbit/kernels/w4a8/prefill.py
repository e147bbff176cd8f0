"""Compute-bound W4A8 / W8A8 GEMM for large token counts (prefill).

Step 1, expand (`expand.py`): the packed int4 weight is unpacked into a one-layer int8
workspace, in the same launch as the per-token activation quantization.

Step 2, GEMM (here): int8 x int8 -> int32 on tensor cores, tiles grouped along M for L2
reuse; per-row weights accumulate in int32 over all of K, group-wise weights
convert each group's int32 sum and scale it; epilogue: x per-token scale, bias,
cast to bf16/fp16/fp32. Two kernels share the epilogue: a pointer-based one (autotuned, any
operands) and, on Hopper for per-row weights, one with TMA operand loads on a persistent grid.

    y[m, n] = sa[m] * sum_g sw[n, g] * sum_{k in g} qa[m, k] * W8[n, k]  (+ bias[n])
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.kernels import interpreter_enabled
from lowbit.kernels.w4a8.gemv_dp4a import num_sms

# -- pointer-based int8 GEMM -------------------------------------------------------------
OFFSET_LIMIT = 2**31  # the pointer kernel's operand offsets are int32 element counts


def _gemm_configs() -> list:
    # NOTE: candidates measured on H100 (benchmarks/bench_linear.py); BLOCK_K=128 feeds wgmma
    # 128-byte rows, GROUP_M=8 keeps a band of A tiles in L2.
    cfgs = []
    for bm, bn, bk, w, s in [
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4),
        (128, 256, 64, 8, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=w, num_stages=s))
    return cfgs


@triton.jit
def _int8_gemm_epilogue(acc_i, acc, sa_ptr, sb_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_sbn,
                        stride_cm, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-row weights: int32 sums x weight scale; then x per-token scale, + bias, cast, store."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GROUP == 0:
        sb = tl.load(sb_ptr + offs_n * stride_sbn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc_i.to(tl.float32) * sb[None, :]
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    acc = acc * sa[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int8_gemm_kernel(
    a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_bn, stride_sbn, stride_cm,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- tile mapping: grouped ordering so consecutive programs share A rows in L2 ---------
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    # Rows past M / N wrap around (loads stay in bounds without a mask; stores are masked).
    # int32 offsets: the launcher checks M*K and N*K fit.
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    # -- pointers: A (M, K) row-major; B (N, K) row-major read as a K-major (K, N) tile -----
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_bn[None, :] * stride_bn + offs_k[:, None]
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # -- K loop --------------------------------------------------------------------------
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0)
        if GROUP == 0:
            acc_i = tl.dot(a, b, acc=acc_i, out_dtype=tl.int32)
        else:  # BLOCK_K == GROUP: one group per step
            d = tl.dot(a, b, out_dtype=tl.int32)
            sb = tl.load(sb_ptr + offs_bn * stride_sbn + k0 // GROUP).to(tl.float32)
            acc += d.to(tl.float32) * sb[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # -- epilogue: per-token x per-channel scales, bias; store ---------------------------
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _int8_gemm_epilogue(acc_i, acc, sa_ptr, sb_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_sbn,
                        stride_cm, GROUP, HAS_BIAS)


@functools.cache
def _tuned_kernel(group: int):
    cfgs = _gemm_configs()
    if group:  # group-wise: BLOCK_K must equal the group
        cfgs = [c for c in cfgs if c.kwargs["BLOCK_K"] == 128]
        cfgs = [triton.Config({**c.kwargs, "BLOCK_K": group}, num_warps=c.num_warps,
                              num_stages=c.num_stages) for c in cfgs]
    return triton.autotune(configs=cfgs, key=["M_BUCKET", "N", "K"])(
        triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_int8_gemm_kernel_bucketed))


@triton.jit
def _int8_gemm_kernel_bucketed(
    a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET,
    stride_am, stride_bn, stride_sbn, stride_cm,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _int8_gemm_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K,
                      stride_am, stride_bn, stride_sbn, stride_cm, GROUP, HAS_BIAS, EVEN_K,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def int8_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
              bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
              config: dict | None = None, tma: bool = True) -> torch.Tensor:
    """qa (M, K) int8, sa (M, 1) fp32, qw (N, K) int8, sw (N, G); group_size == K: per row.

    tma=True lets takes_tma() choose the TMA kernel where it applies (never with `config` or under
    the interpreter); tma=False keeps the pointer kernel (autotuned, or `config`)."""
    m, k = qa.shape
    n = qw.shape[0]
    if qw.shape[1] != k:
        raise ValueError(f"weight K={qw.shape[1]} != activation K={k}")
    if qa.stride(1) != 1 or qw.stride(1) != 1:
        raise ValueError("int8 GEMM operands need a unit last stride")
    group = 0 if group_size >= k else group_size
    if tma and config is None and takes_tma(qa, qw, group, out_dtype):
        return int8_gemm_tma(qa, sa, qw, sw, bias, group_size, out_dtype, TMA_CONFIG)
    # the pointer kernel's operand offsets are int32 element counts
    if n * max(k, qw.stride(0)) >= OFFSET_LIMIT:
        raise ValueError(f"int8 GEMM offsets are int32: N*K must be < 2**31 (N={n}, K={k})")
    row_elems = max(k, qa.stride(0), 1)
    if m * row_elems >= OFFSET_LIMIT:  # long prompts: runs of rows that each fit, into one output
        rows = (OFFSET_LIMIT - 1) // row_elems
        out = torch.empty((m, n), dtype=out_dtype, device=qa.device)
        for r0 in range(0, m, rows):
            r1 = min(r0 + rows, m)
            out[r0:r1] = int8_gemm(qa[r0:r1], sa.reshape(-1, 1)[r0:r1], qw, sw, bias, group_size, out_dtype,
                                   config, tma=False)
        return out
    # the kernels read the token scales, each row's group scales and the bias with unit stride
    sa, sw = sa.contiguous(), sw.contiguous()
    bias = bias.contiguous() if bias is not None else None
    c = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    dummy = sw
    args = (qa, sa, qw, sw, bias if bias is not None else dummy, c, m, n, k)
    strides = (qa.stride(0), qw.stride(0), sw.stride(0), c.stride(0))
    flags = dict(GROUP=group, HAS_BIAS=bias is not None)
    if config is not None or interpreter_enabled():
        cfg = dict(config or {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": group or 32, "GROUP_M": 4})
        if group:
            cfg["BLOCK_K"] = group
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _int8_gemm_kernel[grid](*args, *strides, **flags, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg)
        return c
    bucket = min(triton.next_power_of_2(m), 8192)
    kernel = _tuned_kernel(group)
    tuned_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel[tuned_grid](qa, sa, qw, sw, bias if bias is not None else dummy, c, m, n, k, bucket, *strides,
                 **flags)
    return c


# -- on Hopper: persistent grid, operand tiles by the tensor-memory copy engine -----------
@triton.jit
def _int8_gemm_tma_kernel(
    a_desc, sa_ptr, b_desc, sb_ptr, bias_ptr, c_ptr,
    M, N, K, stride_sbn, stride_cm,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    # Same arithmetic as _int8_gemm_kernel; A (M, K) and B (N, K) tiles arrive through TMA
    # descriptors (out-of-bounds rows and K columns read as zero, so no masks and no wrap-around),
    # and each program walks output tiles NUM_PROGRAMS apart in grouped order.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    width = GROUP_M * num_n
    # flatten: the K loops of consecutive tiles form one software pipeline (the next tile's
    # first operand loads are in flight during this tile's epilogue)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=True):
        group_id = tile // width
        first_m = group_id * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % width) % size_m
        pid_n = (tile % width) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([off_n, ki * BLOCK_K])
            if GROUP == 0:
                acc_i = tl.dot(a, b.T, acc=acc_i, out_dtype=tl.int32)
            else:  # BLOCK_K == GROUP: one group per step
                d = tl.dot(a, b.T, out_dtype=tl.int32)
                sbg = tl.load(sb_ptr + offs_n * stride_sbn + ki, mask=mask_n, other=0.0).to(tl.float32)
                acc += d.to(tl.float32) * sbg[None, :]
        offs_m = off_m + tl.arange(0, BLOCK_M)
        _int8_gemm_epilogue(acc_i, acc, sa_ptr, sb_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N, stride_sbn,
                            stride_cm, GROUP, HAS_BIAS)


def tma_operands_ok(qa: torch.Tensor, qw: torch.Tensor) -> bool:
    """TMA descriptors need non-empty operands, 16-byte aligned bases and row strides, and a unit
    last stride."""
    return all(t.numel() > 0 and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (qa, qw))


# NOTE: H100, benchmarks/probe_tma_gemm.py (results/probe_tma_gemm_h100.json, sweep of 9 configs on
# 8 shapes x M in {2048, 8192}, per row): 128x256x128 tiles, 8 warps, 4 stages won on 14 of 16 (the
# others: 3 stages for 22016x4096 at M=8192, 1224.6 vs 1308.7 us; 128x128 tiles for 1024x4096 at
# M=2048) and took the GEMM 6-19% under the pointer kernel (4096x4096 M=8192 228.5 vs 264.1 us,
# 22016x4096 M=8192 1308.7 vs 1393.7). GROUP_M 8 vs 16 moved it by under 1% on most shapes, 4 was up
# to 6% slower (probe_tma_variants_h100.json); an epilogue through a TMA store needed 263 KB of
# shared memory at 4 stages. Group-wise weights stay on the pointer kernel: the TMA kernel ran
# 1.2-1.8x slower there (same files). With fewer 128x256 tiles than multiprocessors (1024x4096 at
# M=2048: 64) the pointer kernel's smaller autotuned tiles win (21.9 vs 23.6 us).
TMA_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 4}


def takes_tma(qa: torch.Tensor, qw: torch.Tensor, group: int, out_dtype: torch.dtype) -> bool:
    """int8_gemm's choice: the TMA kernel for per-row weights and 16-bit outputs on a Hopper GPU
    (compute capability 9.x) when the operands suit TMA and the output has at least one 128x256 tile
    per multiprocessor. (A float32 128x256 output tile does not fit beside TMA_CONFIG's 4 stages
    in shared memory: 327 KB needed on the H100.)"""
    if group or out_dtype not in (torch.float16, torch.bfloat16):
        return False
    if not qa.is_cuda or interpreter_enabled() or not tma_operands_ok(qa, qw):
        return False
    # Hopper only: TMA_CONFIG's 192 KB of operand stages fit the H100's 227 KB of shared memory per
    # block, not the ~99 KB of the sm_12x parts; other architectures were not measured.
    if torch.cuda.get_device_capability(qa.device)[0] != 9:
        return False
    tiles = triton.cdiv(qa.shape[0], TMA_CONFIG["BLOCK_M"]) * triton.cdiv(qw.shape[0], TMA_CONFIG["BLOCK_N"])
    return tiles >= num_sms(qa.device.index)


def int8_gemm_tma(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
                  config: dict, num_programs: int | None = None) -> torch.Tensor:
    """int8_gemm with TMA operand loads and a persistent grid (Hopper); same inputs and result.

    config: BLOCK_M, BLOCK_N, BLOCK_K (== group_size for group-wise weights), GROUP_M, num_warps,
    num_stages. num_programs defaults to the GPU's multiprocessor count (4 under the interpreter).
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = qa.shape
    n = qw.shape[0]
    if qw.shape[1] != k:
        raise ValueError(f"weight K={qw.shape[1]} != activation K={k}")
    c = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    if m == 0 or n == 0:
        return c
    if not tma_operands_ok(qa, qw):
        raise ValueError("TMA int8 GEMM needs K > 0, 16-byte aligned operand bases and row strides, and a "
                         f"unit last stride (got strides {qa.stride()} / {qw.stride()})")
    group = 0 if group_size >= k else group_size
    cfg = dict(config)
    warps, stages = cfg.pop("num_warps", 8), cfg.pop("num_stages", 3)
    if group:
        cfg["BLOCK_K"] = group
    sa, sw = sa.contiguous(), sw.contiguous()  # read with unit stride (token scales, group scales, bias)
    bias = bias.contiguous() if bias is not None else None
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    if num_programs is None:
        num_programs = 4 if interpreter_enabled() else num_sms(qa.device.index)
    programs = max(1, min(num_programs, tiles))
    a_desc = TensorDescriptor(qa, [m, k], [qa.stride(0), 1], [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    b_desc = TensorDescriptor(qw, [n, k], [qw.stride(0), 1], [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    _int8_gemm_tma_kernel[(programs,)](
        a_desc, sa, b_desc, sw, bias if bias is not None else sw, c, m, n, k, sw.stride(0), c.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, NUM_PROGRAMS=programs, num_warps=warps,
        num_stages=stages, **cfg,
    )
    return c
