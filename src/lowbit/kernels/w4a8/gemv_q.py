"""W4A8 GEMV for 1-4 tokens from activations already quantized per token (dp4a), K looped in chunks.

    y[m, n] = sa[m] * sum_g s[n, g] * ( sum_{k in g} qa[m, k] * u[n, k]  -  8 * sum_{k in g} qa[m, k] )

Same integer math as gemv_dp4a.py (u = stored nibble XOR 8 in [0, 15], one dp4a per four
weights), but the int8 activations qa (M, K) and their scales sa (M, 1) come in ready-made: in a
torch.compile'd graph act_quant_traceable computes them inside the kernel that produces x (the
RMSNorm or SwiGLU), so this kernel does no absmax, no division and reads K bytes of activations
instead of 2K. The `stream` kernel keeps a whole (next-pow2-of-K) row tile in registers, which
pads K=11008 to 16384 (a third of its loads and dots masked off); here K is walked in chunks of
BLOCK_W words (8 weights per int32 word), so only the last chunk is partial.

Activation words: two int32 loads give q[8t .. 8t+3] and q[8t+4 .. 8t+7]; one byte permute
(`prmt`) each turns them into the even-k word (q0 q2 q4 q6) and the odd-k word (q1 q3 q5 q7)
that pair with the low and high nibbles of weight word t. Per-row scales keep one int32
accumulator over the whole K (|sum| <= K * 127 * 15 < 2**31 for K < 1.1M); group scales fold
each chunk's per-group sums into a float accumulator (the chunk holds whole groups).
Under TRITON_INTERPRET the dp4a and the permute are emulated with shifts (same integers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels import interpreter_enabled
from lowbit.kernels.w4a8.gemv_dp4a import DP4A_MAX_M, _dp4a


@triton.jit
def _prmt(a, b, SEL: tl.constexpr, USE_ASM: tl.constexpr):
    """Bytes (a0 a2 b0 b2) for SEL=0x6420, (a1 a3 b1 b3) for SEL=0x7531 (byte 0 = lowest)."""
    if USE_ASM:
        if SEL == 0x6420:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x6420;", "=r,r,r", [a, b],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7531;", "=r,r,r", [a, b],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        o: tl.constexpr = 0 if SEL == 0x6420 else 8
        return (((a >> o) & 0xFF) | (((a >> (o + 16)) & 0xFF) << 8) | (((b >> o) & 0xFF) << 16)
                | (((b >> (o + 16)) & 0xFF) << 24))


@triton.jit
def _w4a8_gemv_q_kernel(
    q_ptr, sa_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, KW, KW4, stride_qm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # q_ptr: int32 words of the int8 activations (4 per word), row stride stride_qm words.
    # w_ptr: int32 words of the packed weight (8 nibbles per word), KW words per row.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)[:, None, None]
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N)[None, :, None]  # wrap: no row masks on the loads (stores are masked)
    offs_w = tl.arange(0, BLOCK_W)[None, None, :]
    m_ok = offs_m < M
    w_rows = w_ptr + rows * stride_wn
    q_rows = q_ptr + offs_m * stride_qm
    ONES = 0x01010101
    GW: tl.constexpr = GROUP // 8 if GROUP != 0 else BLOCK_W  # words per scale group
    NGC: tl.constexpr = BLOCK_W // GW  # groups per chunk
    shape: tl.constexpr = (BLOCK_M, BLOCK_N, BLOCK_W)
    acc = tl.zeros(shape, tl.int32)
    xs = tl.zeros((BLOCK_M, 1, BLOCK_W), tl.int32)
    accf = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for c in range(0, tl.cdiv(KW, BLOCK_W)):
        t = c * BLOCK_W + offs_w
        ok = t < KW4 * 4  # KW4 = KW // 4: constant over 4 words -> 16-byte weight loads
        w = tl.load(w_rows + t, mask=ok, other=0)
        a = tl.load(q_rows + 2 * t, mask=m_ok & ok, other=0)
        b = tl.load(q_rows + 2 * t + 1, mask=m_ok & ok, other=0)
        xe = _prmt(a, b, 0x6420, USE_ASM)
        xo = _prmt(a, b, 0x7531, USE_ASM)
        lo = (w & 0x0F0F0F0F) ^ 0x08080808
        hi = ((w >> 4) & 0x0F0F0F0F) ^ 0x08080808
        if GROUP == 0:
            acc = _dp4a(tl.broadcast_to(lo, shape), tl.broadcast_to(xe, shape), acc, USE_ASM)
            acc = _dp4a(tl.broadcast_to(hi, shape), tl.broadcast_to(xo, shape), acc, USE_ASM)
            xs = _dp4a(tl.full(xe.shape, ONES, tl.int32), xe, xs, USE_ASM)
            xs = _dp4a(tl.full(xo.shape, ONES, tl.int32), xo, xs, USE_ASM)
        else:
            d = _dp4a(tl.broadcast_to(lo, shape), tl.broadcast_to(xe, shape), tl.zeros(shape, tl.int32),
                      USE_ASM)
            d = _dp4a(tl.broadcast_to(hi, shape), tl.broadcast_to(xo, shape), d, USE_ASM)
            xw = _dp4a(tl.full(xe.shape, ONES, tl.int32), xe, tl.zeros(xe.shape, tl.int32), USE_ASM)
            xw = _dp4a(tl.full(xo.shape, ONES, tl.int32), xo, xw, USE_ASM)
            dg = tl.sum(tl.reshape(d, (BLOCK_M, BLOCK_N, NGC, GW)), axis=3)
            xg = tl.sum(tl.reshape(xw, (BLOCK_M, 1, NGC, GW)), axis=3)
            g = c * NGC + tl.arange(0, NGC)
            sw = tl.load(s_ptr + rows * stride_sn + g[None, None, :], mask=(g < KW // GW)[None, None, :],
                         other=0.0).to(tl.float32)
            accf += tl.sum((dg - 8 * xg).to(tl.float32) * sw, axis=2)
    out_n = offs_n[None, :]
    out_m = tl.arange(0, BLOCK_M)[:, None]
    if GROUP == 0:
        d = tl.sum(acc, axis=2) - 8 * tl.sum(xs, axis=2)  # (BLOCK_M, BLOCK_N)
        accf = d.to(tl.float32) * tl.load(s_ptr + (offs_n % N) * stride_sn).to(tl.float32)[None, :]
    sa = tl.load(sa_ptr + out_m, mask=out_m < M, other=0.0)
    y = accf * sa
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n % N).to(tl.float32)[None, :]
    tl.store(out_ptr + out_m * stride_om + out_n, y.to(out_ptr.dtype.element_ty),
             mask=(out_m < M) & (out_n < N))


def gemv_q_unsupported(m: int, k: int, group_size: int) -> str | None:
    """Why (m, k, group_size) cannot run here, or None."""
    if m > DP4A_MAX_M:
        return f"at most {DP4A_MAX_M} tokens, got {m}"
    if k % 32:
        return f"K={k} is not a multiple of 32"
    if group_size < k and (group_size % 8 or 1024 % group_size):
        return f"group_size={group_size} must be a multiple of 8 that divides 1024"
    return None


def gemv_q_config(m: int, n: int, k: int, group: int) -> dict:
    """Launch config: BLOCK_N rows per program, BLOCK_W words per K chunk, warps, stages."""
    if interpreter_enabled():
        bw = 8 if not group else max(8, group // 8)
        return dict(BLOCK_N=4, BLOCK_W=bw, num_warps=2)
    # NOTE: H100 sweep, each config timed as 8 back-to-back launches on distinct weights (what a
    # decode step does; results/decode_gemv_*_h100.json). Per row, M=1: narrow layers want many
    # small programs (4096x4096: 2 rows x 256 words, 2 warps: 6.2 us vs 7.4 for 8 x 128), long K
    # wants 4 x 256 (4096x11008: 11.7 us), wide N wants 32-row tiles (12288x4096: 11.5 us,
    # 22016x4096: 18.5 us).
    if m > 1:
        cfg = dict(BLOCK_N=4, BLOCK_W=128, num_warps=4, num_stages=1)
    elif k > 8192:
        cfg = dict(BLOCK_N=4, BLOCK_W=256, num_warps=4, num_stages=1)
    elif n <= 4096:
        cfg = dict(BLOCK_N=2, BLOCK_W=256, num_warps=2, num_stages=3)
    else:
        wide = n > 16384
        cfg = dict(BLOCK_N=32, BLOCK_W=64 if wide else 128, num_warps=4 if wide else 8, num_stages=1)
    if group:  # a chunk holds whole groups (group is a power of two <= 1024)
        cfg["BLOCK_W"] = max(cfg["BLOCK_W"], group // 8)
    return cfg


def w4a8_gemv_q(qa: torch.Tensor, sa: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
                config: dict | None = None) -> torch.Tensor:
    """qa (M <= 4, K) int8, sa (M, 1) float32, packed (N, K/2) uint8 symmetric int4, scale (N, G).

    Returns (M, N) in out_dtype: sa * (qa @ (q * s)^T) + bias, with integer dots.
    """
    m, k = qa.shape
    n = packed.shape[0]
    if qa.dtype != torch.int8 or sa.dtype != torch.float32:
        raise ValueError(f"qa must be int8 and sa float32, got {qa.dtype} and {sa.dtype}")
    if packed.shape[1] * 2 != k:
        raise ValueError(f"packed weight K={packed.shape[1] * 2} does not match activation K={k}")
    reason = gemv_q_unsupported(m, k, group_size)
    if reason:
        raise ValueError(f"W4A8 GEMV: {reason}")
    group = 0 if group_size >= k else group_size
    if group and k % group:
        raise ValueError(f"W4A8 GEMV: K={k} is not a multiple of group_size={group}")
    n_groups = k // group if group else 1
    if scale.shape != (n, n_groups) or sa.numel() != m:
        raise ValueError(f"W4A8 GEMV: scale must be ({n}, {n_groups}) and sa ({m}, 1), got "
                         f"{tuple(scale.shape)} and {tuple(sa.shape)}")
    scale = scale if scale.stride(-1) == 1 or n_groups == 1 else scale.contiguous()
    qa = qa.contiguous()
    sa = sa.reshape(m).contiguous()
    words = packed.contiguous().view(torch.int32)
    qw = qa.view(torch.int32)
    out = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    if m == 0 or n == 0:
        return out
    cfg = dict(config or gemv_q_config(m, n, k, group))
    if group and (cfg["BLOCK_W"] * 8) % group:
        raise ValueError(f"BLOCK_W={cfg['BLOCK_W']} words must hold whole groups of {group}")
    kw = k // 8
    _w4a8_gemv_q_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        qw, sa, words, scale, bias if bias is not None else scale, out,
        m, n, kw, kw // 4, qw.stride(0), words.stride(0), scale.stride(0), out.stride(0),
        GROUP=group, HAS_BIAS=bias is not None, USE_ASM=not interpreter_enabled(),
        BLOCK_M=triton.next_power_of_2(max(m, 1)), **cfg)
    return out
