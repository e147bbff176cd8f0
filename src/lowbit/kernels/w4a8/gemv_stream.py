"""Persistent W4A8 GEMV for 1-4 tokens (dp4a), activation quantization fused: the `stream` kernel.

Math as in gemv_dp4a.py. A persistent grid (a few programs per SM): each program quantizes the
token rows once (absmax, IEEE division, half-to-even -- bit-identical to the reference int8
activations), keeps them packed in registers and walks full-K row tiles of the weight with the
next tile's load in flight. The token rows are read straight into the word layout of the weight
tile (eight strided loads, one per nibble position), so the activation words, the weight words
and the dp4a results share one register layout: the tile loop has no shared-memory layout
conversions (an earlier version converted every weight tile through shared memory, with 8-byte
loads; 22016x4096 g128 ran 33.0 us against 27.9 us here, results/tune_w4a8_stream_h100.json).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from lowbit.kernels import interpreter_enabled
from lowbit.kernels.fused import _silu_mul
from lowbit.kernels.w4a8.act_quant import _int8_round_clamp, _int8_scale
from lowbit.kernels.w4a8.gemv_dp4a import _dp4a, num_sms


@triton.jit
def _byte(q, i: tl.constexpr):
    return (q & 0xFF) << (8 * i)


@triton.jit
def _w4a8_stream_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, nw_ptr, res_ptr, amax_ptr,
    M, N, K, K32, stride_xm, stride_wn, stride_sn, stride_om, stride_rm, eps,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PPS: tl.constexpr,
    DEPTH: tl.constexpr, NORM: tl.constexpr = False, RES: tl.constexpr = False,
    SWIGLU: tl.constexpr = False,
):
    # Decode-layer fusions (decode_block.py), all optional:
    #   NORM    x is the residual stream: RMSNorm(x) * nw (the model's roundings) before quantizing
    #   SWIGLU  weight rows [gate; up] (2N rows): out = silu(gate) * up (N columns), and each
    #           program's running max |out| per token goes to amax_ptr (M, programs)
    #   RES     out = res + (the linear's output rounded to out's dtype)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    T: tl.constexpr = K_PAD // 8
    G: tl.constexpr = GROUP if GROUP != 0 else K_PAD
    NG: tl.constexpr = K_PAD // G
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_t = tl.arange(0, T)[None, None, :]
    t_ok = offs_t < K32 * 4  # K32 = K // 32: the mask is constant over 4 words -> 16-byte loads
    offs_bn = tl.arange(0, BLOCK_N)[None, :, None]
    # -- first weight tiles in flight before the activation work -------------------------
    rows = (pid * BLOCK_N + offs_bn) % N
    w = tl.load(w_ptr + rows * stride_wn + offs_t, mask=t_ok, other=0)
    if SWIGLU:  # the matching up rows (DEPTH is 1)
        wu = tl.load(w_ptr + (rows + N) * stride_wn + offs_t, mask=t_ok, other=0)
    else:
        wu = w
    rows2 = ((pid + nprog) * BLOCK_N + offs_bn) % N
    if DEPTH == 2:
        w2 = tl.load(w_ptr + rows2 * stride_wn + offs_t, mask=t_ok, other=0)
    else:
        w2 = w
    # -- token rows -> packed int8 words (even k, odd k) in the weight tile's layout ------
    offs_m = tl.arange(0, BLOCK_M)[:, None, None]
    x_ok = (offs_m < M) & t_ok
    xp = x_ptr + offs_m * stride_xm + offs_t * 8
    v0 = tl.load(xp + 0, mask=x_ok, other=0.0).to(tl.float32)
    v1 = tl.load(xp + 1, mask=x_ok, other=0.0).to(tl.float32)
    v2 = tl.load(xp + 2, mask=x_ok, other=0.0).to(tl.float32)
    v3 = tl.load(xp + 3, mask=x_ok, other=0.0).to(tl.float32)
    v4 = tl.load(xp + 4, mask=x_ok, other=0.0).to(tl.float32)
    v5 = tl.load(xp + 5, mask=x_ok, other=0.0).to(tl.float32)
    v6 = tl.load(xp + 6, mask=x_ok, other=0.0).to(tl.float32)
    v7 = tl.load(xp + 7, mask=x_ok, other=0.0).to(tl.float32)
    if NORM:
        DT: tl.constexpr = x_ptr.dtype.element_ty
        ss = ((v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)) + ((v4 * v4 + v5 * v5) + (v6 * v6 + v7 * v7))
        r = tl.math.rsqrt(tl.sum(ss, axis=2, keep_dims=True) / K + eps)  # (BLOCK_M, 1, 1)
        wp = nw_ptr + offs_t * 8
        v0 = _rms_scale(v0, r, wp + 0, t_ok, DT)
        v1 = _rms_scale(v1, r, wp + 1, t_ok, DT)
        v2 = _rms_scale(v2, r, wp + 2, t_ok, DT)
        v3 = _rms_scale(v3, r, wp + 3, t_ok, DT)
        v4 = _rms_scale(v4, r, wp + 4, t_ok, DT)
        v5 = _rms_scale(v5, r, wp + 5, t_ok, DT)
        v6 = _rms_scale(v6, r, wp + 6, t_ok, DT)
        v7 = _rms_scale(v7, r, wp + 7, t_ok, DT)
    amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))),
                      tl.maximum(tl.maximum(tl.abs(v4), tl.abs(v5)), tl.maximum(tl.abs(v6), tl.abs(v7))))
    sa = _int8_scale(tl.max(amax, axis=2, keep_dims=True))  # (BLOCK_M, 1, 1)
    q0 = _int8_round_clamp(v0, sa).to(tl.int32)
    q1 = _int8_round_clamp(v1, sa).to(tl.int32)
    q2 = _int8_round_clamp(v2, sa).to(tl.int32)
    q3 = _int8_round_clamp(v3, sa).to(tl.int32)
    q4 = _int8_round_clamp(v4, sa).to(tl.int32)
    q5 = _int8_round_clamp(v5, sa).to(tl.int32)
    q6 = _int8_round_clamp(v6, sa).to(tl.int32)
    q7 = _int8_round_clamp(v7, sa).to(tl.int32)
    xe = _byte(q0, 0) | _byte(q2, 1) | _byte(q4, 2) | _byte(q6, 3)  # (BLOCK_M, 1, T)
    xo = _byte(q1, 0) | _byte(q3, 1) | _byte(q5, 2) | _byte(q7, 3)
    qsum = ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
    offs_g = tl.arange(0, NG)
    if GROUP != 0:
        xsum = tl.sum(tl.reshape(qsum, (BLOCK_M, NG, G // 8)), axis=2)  # (BLOCK_M, NG)
        xsum1 = xsum
    else:
        xsum1 = tl.sum(qsum, axis=2)  # (BLOCK_M, 1)
        xsum = xsum1
    shape: tl.constexpr = (BLOCK_M, BLOCK_N, T)
    out_m = tl.arange(0, BLOCK_M)[:, None]
    out_bn = tl.arange(0, BLOCK_N)
    ODT: tl.constexpr = out_ptr.dtype.element_ty
    run_max = tl.zeros((BLOCK_M,), tl.float32)
    # -- stream the weight ---------------------------------------------------------------
    for tile in range(pid, n_tiles, nprog):
        nxt = tile + DEPTH * nprog
        rows_next = (nxt * BLOCK_N + offs_bn) % N
        nxt_ok = t_ok & ((nxt * BLOCK_N + offs_bn) < n_tiles * BLOCK_N)
        w_next = tl.load(w_ptr + rows_next * stride_wn + offs_t, mask=nxt_ok, other=0)
        if SWIGLU:
            wu_next = tl.load(w_ptr + (rows_next + N) * stride_wn + offs_t, mask=nxt_ok, other=0)
        else:
            wu_next = w_next
        rows_n = (tile * BLOCK_N + out_bn) % N
        y = _stream_tile(w, xe, xo, sa, xsum, xsum1, s_ptr, rows_n, stride_sn, K, offs_g, shape, GROUP,
                         NG, G, BLOCK_M, BLOCK_N, USE_ASM)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
        offs_n = tile * BLOCK_N + out_bn
        if SWIGLU:
            yu = _stream_tile(wu, xe, xo, sa, xsum, xsum1, s_ptr, rows_n + N, stride_sn, K, offs_g, shape,
                              GROUP, NG, G, BLOCK_M, BLOCK_N, USE_ASM)
            if HAS_BIAS:
                yu += tl.load(bias_ptr + rows_n + N).to(tl.float32)[None, :]
            y = _silu_mul(y.to(ODT), yu.to(ODT), ODT).to(tl.float32)
            run_max = tl.maximum(run_max, tl.max(tl.where((offs_n < N)[None, :], tl.abs(y), 0.0), axis=1))
        if RES:
            r_ok = (out_m < M) & (offs_n < N)[None, :]
            res = tl.load(res_ptr + out_m * stride_rm + offs_n[None, :], mask=r_ok, other=0.0)
            y = res.to(tl.float32) + y.to(ODT).to(tl.float32)
        tl.store(out_ptr + out_m * stride_om + offs_n[None, :], y.to(ODT),
                 mask=(out_m < M) & (offs_n < N)[None, :])
        if DEPTH == 2:
            w = w2
            w2 = w_next
        else:
            w = w_next
            wu = wu_next
    if SWIGLU:
        offs_am = tl.arange(0, BLOCK_M)
        tl.store(amax_ptr + offs_am * nprog + pid, run_max, mask=offs_am < M)


@triton.jit
def _rms_scale(v, r, w_ptrs, mask, DT: tl.constexpr):
    """RMSNorm of one fp32 value as the model rounds it: weight * (x * rsqrt(ms + eps)).to(dtype)."""
    wv = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    return ((v * r).to(DT).to(tl.float32) * wv).to(DT).to(tl.float32)


@triton.jit
def _stream_tile(w, xe, xo, sa, xsum, xsum1, s_ptr, rows_n, stride_sn, K, offs_g, shape: tl.constexpr,
                 GROUP: tl.constexpr, NG: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, USE_ASM: tl.constexpr):
    """One (BLOCK_N x K) weight tile against the packed token rows -> (BLOCK_M, BLOCK_N) fp32."""
    lo = (w & 0x0F0F0F0F) ^ 0x08080808
    hi = ((w >> 4) & 0x0F0F0F0F) ^ 0x08080808
    zero = tl.zeros(shape, tl.int32)
    acc = _dp4a(tl.broadcast_to(lo, shape), tl.broadcast_to(xe, shape), zero, USE_ASM)
    acc = _dp4a(tl.broadcast_to(hi, shape), tl.broadcast_to(xo, shape), acc, USE_ASM)
    if GROUP != 0:
        dg = tl.sum(tl.reshape(acc, (BLOCK_M, BLOCK_N, NG, G // 8)), axis=3) - 8 * xsum[:, None, :]
        sw = tl.load(s_ptr + rows_n[:, None] * stride_sn + offs_g[None, :],
                     mask=(offs_g < K // G)[None, :], other=0.0).to(tl.float32)
        y = tl.sum(dg.to(tl.float32) * sw[None, :, :], axis=2)
    else:
        d = tl.sum(acc, axis=2) - 8 * xsum1
        y = d.to(tl.float32) * tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)[None, :]
    return y * tl.reshape(sa, (BLOCK_M, 1))


# NOTE: H100 sweep of this kernel (results/tune_w4a8_stream_h100.json, 24 configs per shape): the
# rule below is within 1.5% of each shape's best on the Llama layers at M=1 (4% on 1024x4096 and
# 4096x4096 per row); 2-4 token rows want 8 warps (the 4-warp config ran 1.57x slower at M=4), and
# K=11008 (padded to 16384 words in registers) wants 4-row tiles, 2 programs per SM. A fixed rule
# instead of Triton's autotuner: no benchmarking at first call (no 256 MB L2-flush buffer inside a
# user's memory budget, no per-shape compile sweep); LOWBIT_AUTOTUNE=1 turns the sweep back on.
STREAM_SET = [(bn, pps, d, nw) for bn in (2, 4, 8) for pps in (2, 4) for d in (1, 2) for nw in (4, 8)]


def stream_config(m: int, n: int, k: int) -> dict:
    """Launch config (BLOCK_N rows per tile, PPS programs per SM, DEPTH tiles in flight, warps)."""
    if interpreter_enabled():
        return dict(BLOCK_N=4, PPS=2, DEPTH=1, num_warps=4)
    if triton.next_power_of_2(k) > 4096:
        return dict(BLOCK_N=4, PPS=2, DEPTH=1, num_warps=8)
    if m > 1:
        return dict(BLOCK_N=8, PPS=2, DEPTH=1, num_warps=8)
    return dict(BLOCK_N=8, PPS=4, DEPTH=1, num_warps=4)


@functools.cache
def _tuned_kernel():
    cfgs = [triton.Config({"BLOCK_N": bn, "PPS": pps, "DEPTH": d}, num_warps=nw, num_stages=1)
            for bn, pps, d, nw in STREAM_SET]
    return triton.autotune(configs=cfgs, key=["N", "K", "GROUP", "BLOCK_M"])(_w4a8_stream_kernel)


def stream(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor, group: int, config: dict | None, *, norm_weight: torch.Tensor | None = None,
           eps: float = 0.0, residual: torch.Tensor | None = None, swiglu: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch on x (M, K) contiguous rows, words (N, K/8) int32, out (M, N); group 0 = per row.

    The decode-layer fusions (see the kernel): norm_weight (K,) -> RMSNorm(x) first; swiglu ->
    words are [gate; up] (2 N' rows), out is (M, N') and the per-program max |out| comes back as
    amax (M, programs); residual (M, N) -> out = residual + linear. Returns (out, amax or None).
    """
    m, k = x.shape
    n = words.shape[0] // 2 if swiglu else words.shape[0]
    fused = norm_weight is not None or residual is not None or swiglu
    flags = dict(GROUP=group, HAS_BIAS=bias is not None, USE_ASM=not interpreter_enabled(),
                 BLOCK_M=triton.next_power_of_2(m), K_PAD=max(triton.next_power_of_2(k), 32),
                 NORM=norm_weight is not None, RES=residual is not None, SWIGLU=swiglu)
    sms = num_sms(x.device.index or 0) if x.is_cuda else 4

    def grid(meta):
        return (min(triton.cdiv(n, meta["BLOCK_N"]), sms * meta["PPS"]),)

    cfg = dict(config or stream_config(m, n, k))
    if swiglu:
        cfg["DEPTH"] = 1  # the kernel keeps one [gate; up] tile pair in flight
    programs = grid(cfg)[0]
    amax = torch.empty((m, programs), dtype=torch.float32, device=x.device) if swiglu else None
    res = residual if residual is not None else out
    args = (x, words, scale, bias if bias is not None else scale, out,
            norm_weight if norm_weight is not None else x, res, amax if amax is not None else scale,
            m, n, k, k // 32, x.stride(0), words.stride(0), scale.stride(0), out.stride(0), res.stride(0),
            eps)
    autotune = os.environ.get("LOWBIT_AUTOTUNE") == "1" and not interpreter_enabled()
    if config is None and not fused and autotune:
        _tuned_kernel()[grid](*args, **flags)
    else:
        _w4a8_stream_kernel[(programs,)](*args, **flags, **cfg)
    return out, amax
