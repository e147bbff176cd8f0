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
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowbit.kernels import interpreter_enabled
from lowbit.kernels.fused import _silu_mul
from lowbit.kernels.w4a8.act_quant import _int8_round_clamp, _int8_scale
from lowbit.kernels.w4a8.gemv_dp4a import NormIn, _dp4a, num_sms


@triton.jit
def _byte(q, i: tl.constexpr):
    return (q & 0xFF) << (8 * i)


@triton.jit
def _tile_rows(tile, offs, N, BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr, ROPE: tl.constexpr,
               HALF: tl.constexpr):
    """Weight rows of a tile. The paired epilogues pair rows: the tile's BLOCK_N / 2 output pairs
    j take the even offsets for the first row and the odd offsets for its partner. SWIGLU: gate
    row j with up row F + j (F = N / 2). ROPE: the two halves of a head, rows h * 2 HALF + d and
    h * 2 HALF + HALF + d for j = h * HALF + d. Rows past the end wrap (their outputs are not
    stored)."""
    if SWIGLU:
        f = N // 2
        return (offs % 2) * f + (tile * (BLOCK_N // 2) + offs // 2) % f
    elif ROPE:
        j = (tile * (BLOCK_N // 2) + offs // 2) % (N // 2)
        return (j // HALF) * (2 * HALF) + (offs % 2) * HALF + j % HALF
    else:
        return (tile * BLOCK_N + offs) % N


@triton.jit
def _sum_max(s1, m1, s2, m2):
    return s1 + s2, tl.maximum(m1, m2)


@triton.jit
def _mul_rn(a, b, USE_ASM: tl.constexpr):
    """a * b in float32, rounded on its own (no FMA contraction)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _rope_store(y, j, out_m, M, N, q_ptr, stride_qm, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, TOK, S, NQ,
                NK, stride_cb, stride_ch, stride_cs, BLOCK_M: tl.constexpr, HB: tl.constexpr,
                HALF: tl.constexpr, USE_ASM: tl.constexpr):
    """The ROPE epilogue of one tile: y (BLOCK_M, 2 HB) rounded outputs of the row pairs j (HB,)
    (pair j = head h, column d: j = h * HALF + d). Rotates q and k heads with the arithmetic and
    roundings of rope._rope_rows, stores q rows into q_ptr and k / v into the caches at each
    token's position (nothing outside [0, S))."""
    dt = q_ptr.dtype.element_ty
    x1, x2 = tl.split(tl.reshape(y, (BLOCK_M, HB, 2)))
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    head = (j // HALF)[None, :]
    d = (j % HALF)[None, :]
    t = out_m % TOK  # (BLOCK_M, 1)
    c1 = tl.load(cos_ptr + t * (2 * HALF) + d).to(tl.float32)
    c2 = tl.load(cos_ptr + t * (2 * HALF) + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + t * (2 * HALF) + d).to(tl.float32)
    s2 = tl.load(sin_ptr + t * (2 * HALF) + HALF + d).to(tl.float32)
    # mul.rn: never contracted into an FMA with the add (rope._rope_cache_kernel compiles with
    # enable_fp_fusion=False, which this kernel cannot: its GEMV epilogue must round as the plain
    # stream's does)
    f32: tl.constexpr = tl.float32
    r1 = (_mul_rn(x1, c1, USE_ASM).to(dt).to(f32) + _mul_rn(-x2, s1, USE_ASM).to(dt).to(f32)).to(dt)
    r2 = (_mul_rn(x2, c2, USE_ASM).to(dt).to(f32) + _mul_rn(x1, s2, USE_ASM).to(dt).to(f32)).to(dt)
    is_v = head >= NQ + NK
    o1 = tl.where(is_v, x1.to(dt), r1)
    o2 = tl.where(is_v, x2.to(dt), r2)
    ok = (out_m < M) & (j < N // 2)[None, :]
    is_q = head < NQ
    qdst = q_ptr + out_m * stride_qm + head * (2 * HALF) + d
    tl.store(qdst, o1, mask=ok & is_q)
    tl.store(qdst + HALF, o2, mask=ok & is_q)
    p = tl.load(pos_ptr + t).to(tl.int64)
    in_cache = ok & (p >= 0) & (p < S) & (head >= NQ)
    ch = tl.where(is_v, head - NQ - NK, head - NQ).to(tl.int64)
    off = (out_m // TOK).to(tl.int64) * stride_cb + ch * stride_ch + p * stride_cs + d
    tl.store(kc_ptr + off, o1, mask=in_cache & ~is_v)
    tl.store(kc_ptr + off + HALF, o2, mask=in_cache & ~is_v)
    tl.store(vc_ptr + off, o1, mask=in_cache & is_v)
    tl.store(vc_ptr + off + HALF, o2, mask=in_cache & is_v)


@triton.jit
def _w4a8_stream_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, amax_ptr,
    cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, TOK, S, NQ, NK, stride_cb, stride_ch, stride_cs,
    delta_ptr, nw_ptr, h_ptr, stride_dm, stride_hm, eps,
    M, N, K, K32, stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PPS: tl.constexpr,
    DEPTH: tl.constexpr, SWIGLU: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr,
    NORM: tl.constexpr, HAS_DELTA: tl.constexpr,
):
    # SWIGLU: the weight is a fused [gate; up] projection (N = 2F); out (M, F) gets
    # silu(gate) * up (rounded as fused.swiglu rounds the rounded GEMV outputs) and amax_ptr
    # (M, programs) each program's absmax of its outputs per token (act_quant_from_amax).
    # ROPE: the weight is a fused [q; k; v] projection of NQ + 2 NK heads of 2 HALF rows, the M
    # rows are B x TOK decode tokens at positions pos_ptr[t] with cos/sin rows t; q and k are
    # rotated (rounded as rope.rope_cache_update rounds the rounded GEMV outputs), q goes to
    # out (M, NQ * 2 HALF), k and v into the caches (B, NK, S, 2 HALF) at the token's position.
    # NORM: x is the residual stream and the linear takes RMSNorm(h) (weight nw_ptr, eps) of
    # h = x + delta (HAS_DELTA; h rounded to x's dtype, stored into h_ptr, each program a share). The
    # per-token factor r = 1 / sqrt(mean(h^2) + eps) commutes with the per-token quantization, so
    # the kernel quantizes h * nw (float32) and applies r with the activation scale (epilogue).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    T: tl.constexpr = K_PAD // 8
    G: tl.constexpr = GROUP if GROUP != 0 else K_PAD
    NG: tl.constexpr = K_PAD // G
    PAIRED: tl.constexpr = SWIGLU or ROPE
    HB: tl.constexpr = BLOCK_N // 2 if PAIRED else BLOCK_N  # output columns (pairs) per tile
    n_tiles = tl.cdiv(N // 2, HB) if PAIRED else tl.cdiv(N, BLOCK_N)
    offs_t = tl.arange(0, T)[None, None, :]
    t_ok = offs_t < K32 * 4  # K32 = K // 32: the mask is constant over 4 words -> 16-byte loads
    offs_bn = tl.arange(0, BLOCK_N)[None, :, None]
    # -- first weight tiles in flight before the activation work -------------------------
    rows = _tile_rows(pid, offs_bn, N, BLOCK_N, SWIGLU, ROPE, HALF)
    w = tl.load(w_ptr + rows * stride_wn + offs_t, mask=t_ok, other=0)
    rows2 = _tile_rows(pid + nprog, offs_bn, N, BLOCK_N, SWIGLU, ROPE, HALF)
    if DEPTH == 2:
        w2 = tl.load(w_ptr + rows2 * stride_wn + offs_t, mask=t_ok, other=0)
    else:
        w2 = w
    # -- token rows -> packed int8 words (even k, odd k) in the weight tile's layout ------
    # Rows past M (M=3 in a 4-row block) repeat row M - 1 instead of masking: with a row mask the
    # kernel ran about 2x slower (M=3: 35.8 us vs 26.5 at M=4 on 12288x4096, the same block;
    # results/probe_gemv_stream_m3_3db3150_h100.txt; 26.4 us at M=3 since, probe_gemv_stream_m3_
    # h100.json). Their outputs are not stored.
    offs_m = tl.minimum(tl.arange(0, BLOCK_M), M - 1)[:, None, None]
    xp = x_ptr + offs_m * stride_xm + offs_t * 8
    v0 = tl.load(xp + 0, mask=t_ok, other=0.0).to(tl.float32)
    v1 = tl.load(xp + 1, mask=t_ok, other=0.0).to(tl.float32)
    v2 = tl.load(xp + 2, mask=t_ok, other=0.0).to(tl.float32)
    v3 = tl.load(xp + 3, mask=t_ok, other=0.0).to(tl.float32)
    v4 = tl.load(xp + 4, mask=t_ok, other=0.0).to(tl.float32)
    v5 = tl.load(xp + 5, mask=t_ok, other=0.0).to(tl.float32)
    v6 = tl.load(xp + 6, mask=t_ok, other=0.0).to(tl.float32)
    v7 = tl.load(xp + 7, mask=t_ok, other=0.0).to(tl.float32)
    if NORM:
        f32: tl.constexpr = tl.float32
        DT: tl.constexpr = x_ptr.dtype.element_ty
        gp = nw_ptr + offs_t * 8  # the norm weight loads go out with the rows' (before any reduction)
        g0 = tl.load(gp + 0, mask=t_ok, other=0.0)
        g1 = tl.load(gp + 1, mask=t_ok, other=0.0)
        g2 = tl.load(gp + 2, mask=t_ok, other=0.0)
        g3 = tl.load(gp + 3, mask=t_ok, other=0.0)
        g4 = tl.load(gp + 4, mask=t_ok, other=0.0)
        g5 = tl.load(gp + 5, mask=t_ok, other=0.0)
        g6 = tl.load(gp + 6, mask=t_ok, other=0.0)
        g7 = tl.load(gp + 7, mask=t_ok, other=0.0)
        if HAS_DELTA:
            dp = delta_ptr + offs_m * stride_dm + offs_t * 8
            v0 = (v0 + tl.load(dp + 0, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            v1 = (v1 + tl.load(dp + 1, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            v2 = (v2 + tl.load(dp + 2, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            v3 = (v3 + tl.load(dp + 3, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            v4 = (v4 + tl.load(dp + 4, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            v5 = (v5 + tl.load(dp + 5, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            v6 = (v6 + tl.load(dp + 6, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            v7 = (v7 + tl.load(dp + 7, mask=t_ok, other=0.0).to(f32)).to(DT).to(f32)
            # every program stores its share of h (words t with t % programs == pid): no program
            # carries the whole row's stores on the kernel's critical path
            rows_m = tl.arange(0, BLOCK_M)[:, None, None]
            hp = h_ptr + rows_m * stride_hm + offs_t * 8
            h_ok = t_ok & (rows_m < M) & ((offs_t % nprog) == pid)
            tl.store(hp + 0, v0.to(DT), mask=h_ok)
            tl.store(hp + 1, v1.to(DT), mask=h_ok)
            tl.store(hp + 2, v2.to(DT), mask=h_ok)
            tl.store(hp + 3, v3.to(DT), mask=h_ok)
            tl.store(hp + 4, v4.to(DT), mask=h_ok)
            tl.store(hp + 5, v5.to(DT), mask=h_ok)
            tl.store(hp + 6, v6.to(DT), mask=h_ok)
            tl.store(hp + 7, v7.to(DT), mask=h_ok)
        ss = (((_mul_rn(v0, v0, USE_ASM) + _mul_rn(v1, v1, USE_ASM)) + (_mul_rn(v2, v2, USE_ASM)
              + _mul_rn(v3, v3, USE_ASM))) + ((_mul_rn(v4, v4, USE_ASM) + _mul_rn(v5, v5, USE_ASM))
              + (_mul_rn(v6, v6, USE_ASM) + _mul_rn(v7, v7, USE_ASM))))
        v0 = _mul_rn(v0, g0.to(f32), USE_ASM)
        v1 = _mul_rn(v1, g1.to(f32), USE_ASM)
        v2 = _mul_rn(v2, g2.to(f32), USE_ASM)
        v3 = _mul_rn(v3, g3.to(f32), USE_ASM)
        v4 = _mul_rn(v4, g4.to(f32), USE_ASM)
        v5 = _mul_rn(v5, g5.to(f32), USE_ASM)
        v6 = _mul_rn(v6, g6.to(f32), USE_ASM)
        v7 = _mul_rn(v7, g7.to(f32), USE_ASM)
        am = tl.maximum(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))),
                        tl.maximum(tl.maximum(tl.abs(v4), tl.abs(v5)), tl.maximum(tl.abs(v6), tl.abs(v7))))
        # one reduction for both row statistics (one shared-memory round, not two)
        ssum, amax_row = tl.reduce((ss, am), 2, _sum_max, keep_dims=True)
        rr = 1.0 / tl.sqrt_rn(ssum / K + eps)  # (BLOCK_M, 1, 1)
        sa = _int8_scale(amax_row)
    else:
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
    else:
        xsum1 = tl.sum(qsum, axis=2)  # (BLOCK_M, 1)
    shape: tl.constexpr = (BLOCK_M, BLOCK_N, T)
    out_m = tl.arange(0, BLOCK_M)[:, None]
    out_bn = tl.arange(0, BLOCK_N)
    amax_h = tl.zeros((BLOCK_M, HB), tl.float32)
    if NORM:
        sa_out = tl.reshape(sa * rr, (BLOCK_M, 1))
    else:
        sa_out = tl.reshape(sa, (BLOCK_M, 1))
    # -- stream the weight ---------------------------------------------------------------
    for tile in range(pid, n_tiles, nprog):
        nxt = tile + DEPTH * nprog
        rows_next = _tile_rows(nxt, offs_bn, N, BLOCK_N, SWIGLU, ROPE, HALF)
        w_next = tl.load(w_ptr + rows_next * stride_wn + offs_t,
                         mask=t_ok & ((nxt * BLOCK_N + offs_bn) < n_tiles * BLOCK_N), other=0)
        lo = (w & 0x0F0F0F0F) ^ 0x08080808
        hi = ((w >> 4) & 0x0F0F0F0F) ^ 0x08080808
        zero = tl.zeros(shape, tl.int32)
        acc = _dp4a(tl.broadcast_to(lo, shape), tl.broadcast_to(xe, shape), zero, USE_ASM)
        acc = _dp4a(tl.broadcast_to(hi, shape), tl.broadcast_to(xo, shape), acc, USE_ASM)
        rows_n = _tile_rows(tile, out_bn, N, BLOCK_N, SWIGLU, ROPE, HALF)
        if GROUP != 0:
            dg = tl.sum(tl.reshape(acc, (BLOCK_M, BLOCK_N, NG, G // 8)), axis=3) - 8 * xsum[:, None, :]
            sw = tl.load(s_ptr + rows_n[:, None] * stride_sn + offs_g[None, :],
                         mask=(offs_g < K // G)[None, :], other=0.0).to(tl.float32)
            y = tl.sum(dg.to(tl.float32) * sw[None, :, :], axis=2)
        else:
            d = tl.sum(acc, axis=2) - 8 * xsum1
            y = d.to(tl.float32) * tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)[None, :]
        y = y * sa_out
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
        if SWIGLU:
            gate, up = tl.split(tl.reshape(y.to(out_ptr.dtype.element_ty), (BLOCK_M, HB, 2)))
            h = _silu_mul(gate, up, out_ptr.dtype.element_ty)
            cols = tile * HB + tl.arange(0, HB)
            ok = (out_m < M) & (cols < N // 2)[None, :]
            tl.store(out_ptr + out_m * stride_om + cols[None, :], h, mask=ok)
            amax_h = tl.maximum(amax_h, tl.where(ok, tl.abs(h.to(tl.float32)), 0.0))
        elif ROPE:
            _rope_store(y.to(out_ptr.dtype.element_ty), tile * HB + tl.arange(0, HB), out_m, M, N,
                        out_ptr, stride_om, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, TOK, S, NQ, NK,
                        stride_cb, stride_ch, stride_cs, BLOCK_M, HB, HALF, USE_ASM)
        else:
            offs_n = tile * BLOCK_N + out_bn
            tl.store(out_ptr + out_m * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=(out_m < M) & (offs_n < N)[None, :])
        if DEPTH == 2:
            w = w2
            w2 = w_next
        else:
            w = w_next
    if SWIGLU:
        pm = tl.arange(0, BLOCK_M)
        tl.store(amax_ptr + pm * nprog + pid, tl.max(amax_h, axis=1), mask=pm < M)


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


class RopeCache(NamedTuple):
    """The ROPE epilogue's operands: cos / sin (T, 2 HALF) rows of the tokens' positions pos (T,)
    (int32/int64, on the device), the static caches kc / vc (B, n_k, S, 2 HALF) (equal strides,
    unit last stride), n_q query and n_k key/value heads, T tokens per sequence (M = B x T)."""

    cos: torch.Tensor
    sin: torch.Tensor
    pos: torch.Tensor
    kc: torch.Tensor
    vc: torch.Tensor
    n_q: int
    n_k: int
    t: int


def stream(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor, group: int, config: dict | None, amax: torch.Tensor | None = None,
           rope: RopeCache | None = None, norm: NormIn | None = None) -> torch.Tensor:
    """Launch on x (M, K) contiguous rows, words (N, K/8) int32, out (M, N); group 0 = per row.

    amax given: the SwiGLU epilogue (N = 2F, out (M, F)); amax must be a float32 buffer of
    M x stream_programs(...) elements, filled with each program's per-token absmax.
    rope given: the RoPE + KV-cache epilogue (N = (n_q + 2 n_k) * 2 HALF, out (M, n_q * 2 HALF)
    gets the rotated q; the rotated k and the v are written into rope.kc / rope.vc). The caller
    checks the operands (gemv_dp4a.w4a8_gemv_rope_cache).
    norm given: the NORM prologue (x is the residual stream; see NormIn and the kernel).
    """
    if amax is not None and rope is not None:
        raise ValueError("stream: one epilogue at a time (amax for SwiGLU or rope)")
    m, k = x.shape
    n = words.shape[0]
    swiglu = amax is not None
    paired = swiglu or rope is not None
    if rope is not None:
        kc = rope.kc
        rope_args = (rope.cos, rope.sin, rope.pos, kc, rope.vc, rope.t, kc.shape[2], rope.n_q, rope.n_k,
                     kc.stride(0), kc.stride(1), kc.stride(2))
        half = kc.shape[-1] // 2
    else:
        rope_args = (scale, scale, scale, scale, scale, 1, 0, 0, 0, 0, 0, 0)
        half = 1
    if norm is not None:
        delta = norm.delta if norm.delta is not None else x
        h_out = norm.h_out if norm.h_out is not None else x
        norm_args = (delta, norm.weight, h_out, delta.stride(0), h_out.stride(0), norm.eps)
    else:
        norm_args = (x, x, x, 0, 0, 0.0)
    args = (x, words, scale, bias if bias is not None else scale, out, amax if swiglu else scale, *rope_args,
            *norm_args, m, n, k, k // 32, x.stride(0), words.stride(0), scale.stride(0), out.stride(0))
    flags = dict(GROUP=group, HAS_BIAS=bias is not None, USE_ASM=not interpreter_enabled(),
                 BLOCK_M=triton.next_power_of_2(m), K_PAD=max(triton.next_power_of_2(k), 32), SWIGLU=swiglu,
                 ROPE=rope is not None, HALF=half, NORM=norm is not None,
                 HAS_DELTA=norm is not None and norm.delta is not None)
    sms = num_sms(x.device.index or 0) if x.is_cuda else 4

    def grid(meta):
        return (_programs(n, meta["BLOCK_N"], meta["PPS"], sms, paired),)

    tune = os.environ.get("LOWBIT_AUTOTUNE") == "1" and not interpreter_enabled() and not paired
    if config is None and tune:
        _tuned_kernel()[grid](*args, **flags)
    else:
        cfg = dict(config or stream_config(m, n, k))
        if amax is not None and amax.numel() != m * grid(cfg)[0]:
            raise ValueError(f"stream: amax holds {amax.numel()} values, the launch writes "
                             f"{m * grid(cfg)[0]}")
        _w4a8_stream_kernel[grid(cfg)](*args, **flags, **cfg)
    return out


def _programs(n: int, block_n: int, pps: int, sms: int, paired: bool) -> int:
    tiles = triton.cdiv(n // 2, block_n // 2) if paired else triton.cdiv(n, block_n)
    return min(tiles, sms * pps)


def stream_programs(x: torch.Tensor, n: int, config: dict | None = None) -> int:
    """Programs of the SwiGLU stream launch on x (M, K) into a [gate; up] weight of N rows."""
    cfg = config or stream_config(x.shape[0], n, x.shape[1])
    sms = num_sms(x.device.index or 0) if x.is_cuda else 4
    return _programs(n, cfg["BLOCK_N"], cfg["PPS"], sms, True)
