"""W4A8 GEMV for 1-4 tokens on integer dot-product instructions (dp4a), act quant fused.

    y[m, n] = sa[m] * sum_g s[n, g] * ( sum_{k in g} qx[m, k] * u[n, k]  -  8 * sum_{k in g} qx[m, k] )

where u = q + 8 in [0, 15] is the stored two's-complement nibble XOR 8, so every
32-bit word of the packed weight yields two words of four unsigned bytes with two
logic ops, and one `dp4a.u32.s32` multiplies four weights by four int8 activations
and accumulates in int32:

    word = bytes j..j+3 of a row:  [w7|w6][w5|w4][w3|w2][w1|w0]   (nibbles, k = 8t + 0..7)
    lo = (word & 0x0F0F0F0F) ^ 0x08080808  ->  u0 u2 u4 u6        (k even)
    hi = ((word >> 4) & 0x0F0F0F0F) ^ 0x08080808  ->  u1 u3 u5 u7  (k odd)
    acc = dp4a(lo, pack(qx0, qx2, qx4, qx6), acc); acc = dp4a(hi, pack(qx1, qx3, qx5, qx7), acc)

About 0.3 instructions per weight instead of ~6 for a float unpack. Two kernels:

  stream (default, gemv_stream.py): a persistent grid; each program quantizes the token rows
    once, keeps them packed in registers and walks full-K row tiles of the weight. Needs
    next_pow2(M) * next_pow2(K) <= 16384 (every Llama layer at M=1; K <= 4096 at M <= 4).
  blocked (here): one program per BLOCK_N rows with a K loop, quantizing its K step of the
    token each step -- the quantization is repeated per program; kept for the rest.

Under TRITON_INTERPRET the dp4a is emulated with shifts (same integers).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from lowbit.kernels import interpreter_enabled
from lowbit.kernels.w4a8.act_quant import _int8_round_clamp, _int8_scale

DP4A_MAX_M = 4


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        acc = c
        for i in tl.static_range(4):
            ua = (a >> (8 * i)) & 0xFF
            sb = (b << (24 - 8 * i)) >> 24
            acc += ua * sb
        return acc


@triton.jit
def _pack4(q):
    """(T, 4) int32 values in [-128, 127] -> (T,) int32 words, element i in byte i."""
    q2 = tl.reshape(q & 0xFF, (q.shape[0], 2, 2))
    even, odd = tl.split(q2)  # elements (0, 2) and (1, 3)
    e0, e2 = tl.split(even)
    e1, e3 = tl.split(odd)
    return e0 | (e1 << 8) | (e2 << 16) | (e3 << 24)


@triton.jit
def _w4a8_dp4a_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    N, K, stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # -- tile mapping: axis 0 = BLOCK_N weight rows, axis 1 = token ------------------------
    pid = tl.program_id(0)
    m = tl.program_id(1)
    rows_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrap: no masks in the K loop
    x_row = x_ptr + m * stride_xm
    w_rows = w_ptr + rows_n[:, None] * stride_wn  # int32 words
    T: tl.constexpr = BLOCK_K // 8  # words per row per step
    G: tl.constexpr = GROUP if GROUP != 0 else BLOCK_K
    NG: tl.constexpr = BLOCK_K // G
    # -- prologue: this token's scale ----------------------------------------------------
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)))
    sa = _int8_scale(tl.max(amax, axis=0))
    acc_f = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_N, T], dtype=tl.int32)
    xsum_all = tl.zeros([NG], dtype=tl.int32)
    # -- K loop --------------------------------------------------------------------------
    for k0 in range(0, K, BLOCK_K):
        # quantize this K step of the token (bit-identical to the reference)
        v = tl.load(x_row + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
        q = _int8_round_clamp(v, sa).to(tl.int32)
        qe, qo = tl.split(tl.reshape(q, (T, 4, 2)))  # even / odd k of each 8-wide word
        xe = _pack4(qe)
        xo = _pack4(qo)
        xsum = tl.sum(tl.reshape(q, (NG, G)), axis=1)  # per group, for the -8 correction
        word = tl.load(w_rows + (k0 // 8 + tl.arange(0, T))[None, :])
        lo = (word & 0x0F0F0F0F) ^ 0x08080808
        hi = ((word >> 4) & 0x0F0F0F0F) ^ 0x08080808
        acc_i = _dp4a(lo, tl.broadcast_to(xe[None, :], (BLOCK_N, T)), acc_i, USE_ASM)
        acc_i = _dp4a(hi, tl.broadcast_to(xo[None, :], (BLOCK_N, T)), acc_i, USE_ASM)
        if GROUP != 0:
            dg = tl.sum(tl.reshape(acc_i, (BLOCK_N, NG, G // 8)), axis=2) - 8 * xsum[None, :]
            sw = tl.load(s_ptr + rows_n[:, None] * stride_sn + (k0 // G + tl.arange(0, NG))[None, :])
            acc_f += tl.sum(dg.to(tl.float32) * sw.to(tl.float32), axis=1)
            acc_i = tl.zeros([BLOCK_N, T], dtype=tl.int32)
        else:
            xsum_all += xsum
    # -- epilogue ------------------------------------------------------------------------
    if GROUP == 0:
        d = tl.sum(acc_i, axis=1) - 8 * tl.sum(xsum_all, axis=0)
        acc_f = d.to(tl.float32) * tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)
    y = acc_f * sa
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


# NOTE: the streamer keeps BLOCK_M x K_PAD fp32 activations live while quantizing; above this
# many elements per program it would spill, and the blocked kernel above takes over.
STREAM_MAX_ELEMS = 16384


def stream_supported(m: int, k: int, group: int) -> bool:
    k_pad = triton.next_power_of_2(k)
    block_m = triton.next_power_of_2(max(m, 1))
    return block_m * k_pad <= STREAM_MAX_ELEMS and k % 8 == 0 and (not group or (k % group == 0 and
                                                                              k_pad % group == 0))


@functools.cache
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def dp4a_config(n: int, k: int, group: int) -> dict:
    """Config used under the interpreter and as the fallback when K rules out the tuned set."""
    block_k = next(b for b in (512, 256, 128, 64, 32) if k % b == 0 and (not group or b % group == 0))
    return dict(BLOCK_N=32, BLOCK_K=block_k, num_warps=4, num_stages=1)


# NOTE: candidates from the H100 sweep (benchmarks/tune_w4a8.py --sections dp4a); the autotuner
# picks per (N, K, GROUP) on first use, outside any CUDA-graph capture (warm-up runs first).
# Small BLOCK_N keeps >= 2 programs per SM on N=4096 layers (4096x11008 ran 72.8 us with 128
# programs of 32 rows).
_TUNED_SET = [(16, 512, 4), (32, 512, 4), (64, 256, 4), (32, 1024, 8), (64, 512, 8), (16, 1024, 4),
              (128, 256, 8), (8, 1024, 4), (4, 1024, 4), (8, 512, 4), (8, 256, 4), (16, 256, 4),
              (4, 256, 4), (32, 256, 4)]


@functools.cache
def _tuned_kernel(block_k_divides: int):
    cfgs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1)
            for bn, bk, w in _TUNED_SET if block_k_divides % bk == 0]
    return triton.autotune(configs=cfgs, key=["N", "K", "GROUP"])(_w4a8_dp4a_kernel)


def dp4a_unsupported(k: int, group_size: int) -> str | None:
    if k % 32:
        return f"K={k} is not a multiple of 32"
    if group_size < k and (group_size % 8 or 512 % group_size):
        return f"group_size={group_size} must divide 512"
    return None


def _dp4a_group(x: torch.Tensor, packed: torch.Tensor, group_size: int, what: str) -> int:
    """Checks x (M <= DP4A_MAX_M, K) against packed (N, K/2) and the group size; returns the kernel's
    group (0 = per row)."""
    m, k = x.shape
    if m > DP4A_MAX_M:
        raise ValueError(f"{what} takes at most {DP4A_MAX_M} tokens, got {m}")
    if packed.shape[1] * 2 != k:
        raise ValueError(f"{what}: the packed weight (N, K/2) has K={packed.shape[1] * 2}, which does not "
                         f"match activation K={k}")
    reason = dp4a_unsupported(k, group_size)
    if reason:
        raise ValueError(f"{what}: {reason}")
    return 0 if group_size >= k else group_size


def w4a8_gemv_dp4a(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   group_size: int, config: dict | None = None, kernel: str = "auto") -> torch.Tensor:
    """x (M <= 4, K) fp16/bf16/fp32, packed (N, K/2) uint8 symmetric int4, scale (N, G) -> (M, N).

    kernel: "stream" (persistent row streamer, activations quantized once per program),
    "blocked" (one program per BLOCK_N rows, K loop), or "auto" (stream when it fits).
    """
    if kernel not in ("auto", "stream", "blocked"):
        raise ValueError(f"kernel={kernel!r}; allowed: auto, stream, blocked")
    m, k = x.shape
    n = packed.shape[0]
    group = _dp4a_group(x, packed, group_size, "the dp4a GEMV")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    words = packed.contiguous().view(torch.int32)
    if kernel == "stream" or (kernel == "auto" and stream_supported(m, k, group)):
        if not stream_supported(m, k, group):
            raise ValueError(f"the streaming dp4a GEMV does not take M={m}, K={k}, group={group_size}")
        from lowbit.kernels.w4a8.gemv_stream import stream

        return stream(x, words, scale, bias, out, group, config)
    args = (x, words, scale, bias if bias is not None else scale, out, n, k, x.stride(0), words.stride(0),
            scale.stride(0), out.stride(0))
    flags = dict(GROUP=group, HAS_BIAS=bias is not None, USE_ASM=not interpreter_enabled())
    if config is None and not interpreter_enabled() and k % 256 == 0 and (not group or 256 % group == 0):
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)
        _tuned_kernel(1024 if k % 1024 == 0 else 256)[grid](*args, **flags)
        return out
    cfg = dict(config or dp4a_config(n, k, group))
    if k % cfg["BLOCK_K"] or (group and cfg["BLOCK_K"] % group):
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} must divide K={k} and be a multiple of the group")
    _w4a8_dp4a_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), m)](*args, **flags, **cfg)
    return out


def _stream_operands(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     group_size: int, what: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Checks the operands of a streaming-GEMV epilogue variant (fp16/bf16 x (M, K), what the stream
    kernel holds) -> (x, int32 weight words, scale, bias) as the kernel reads them, and its group."""
    m, k = x.shape
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{what} takes fp16/bf16 activations, got {x.dtype}")
    group = _dp4a_group(x, packed, group_size, what)
    if not stream_supported(m, k, group):
        raise ValueError(f"{what}: the streaming GEMV does not take M={m}, K={k}, group={group_size}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    return x, packed.contiguous().view(torch.int32), scale, bias, group


class NormIn(NamedTuple):
    """The NORM prologue's operands: the linear takes RMSNorm(h) (weight (K,), eps) of the residual
    stream h = x + delta (delta (M, K) like x, or None: h = x); h goes to h_out (M, K) when delta is
    given."""

    weight: torch.Tensor
    eps: float
    delta: torch.Tensor | None = None
    h_out: torch.Tensor | None = None


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges a and b span in memory intersect."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        lo = t.data_ptr()
        return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _norm_h_only(norm: NormIn | None, x: torch.Tensor) -> None:
    """A launch with no outputs (N = 0) still owes h = x + delta."""
    if norm is not None and norm.delta is not None and norm.h_out is not None:
        norm.h_out.copy_((x.to(torch.float32) + norm.delta.to(torch.float32)).to(x.dtype))


def _stream_norm(x: torch.Tensor, norm: NormIn | None, what: str) -> NormIn | None:
    """Checks the NORM prologue's operands against x (M, K) (NormIn)."""
    if norm is None:
        return None
    k = x.shape[1]
    w = norm.weight
    if w.shape != (k,) or w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"{what}: the norm weight must be ({k},) {x.dtype} on {x.device}, got "
                         f"{tuple(w.shape)} {w.dtype} on {w.device}")
    delta, h_out = norm.delta, norm.h_out
    if delta is None:
        if h_out is not None:
            raise ValueError(f"{what}: the norm's h_out is written only with a delta (h = x without one)")
        return NormIn(w.contiguous(), float(norm.eps), None, None)
    for name, t in (("delta", delta), ("h_out", h_out)):
        if t is None or t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            got = "None" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}"
            raise ValueError(f"{what}: the norm's {name} must match x ({tuple(x.shape)} {x.dtype}), "
                             f"got {got}")
    if h_out is None or h_out.stride(-1) != 1:
        raise ValueError(f"{what}: the norm's h_out must have unit last stride")
    if any(_overlap(h_out, t) for t in (x, delta)):
        raise ValueError(f"{what}: the norm's h_out must not overlap x or delta (every program reads them "
                         f"whole while h is written)")
    delta = delta if delta.stride(-1) == 1 else delta.contiguous()
    return NormIn(w.contiguous(), float(norm.eps), delta, h_out)


def w4a8_gemv_norm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   group_size: int, norm: NormIn, config: dict | None = None) -> torch.Tensor:
    """linear(RMSNorm(h) * norm.weight) for M <= 4 token rows of the residual stream x (M, K)
    fp16/bf16 with h = x + norm.delta (written to norm.h_out; h = x without a delta), on the
    streaming GEMV with the norm in its prologue. The kernel quantizes h * weight per token and
    applies r = 1 / sqrt(mean(h^2) + eps) with the activation scale in the epilogue: the same
    integer dots as quantizing the normalized row, up to that row's rounding (reference:
    reference.norm_gemv_ref)."""
    from lowbit.kernels.w4a8.gemv_stream import stream

    n = packed.shape[0]
    x, words, scale, bias, group = _stream_operands(x, packed, scale, bias, group_size, "w4a8_gemv_norm")
    norm_in = _stream_norm(x, norm, "w4a8_gemv_norm")
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or n == 0:
        _norm_h_only(norm_in, x)
        return out
    stream(x, words, scale, bias, out, group, config, norm=norm_in)
    return out


def w4a8_gemv_swiglu(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     group_size: int, config: dict | None = None, norm: NormIn | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up of a W4A8 [gate; up] projection for M <= 4 tokens, on the streaming GEMV:
    x (M, K) fp16/bf16, packed (2F, K/2) -> (h (M, F) in x's dtype, amax (M, P) float32).

    h equals fused.swiglu(w4a8_gemv_dp4a(x, ...)) (the GEMV outputs rounded to x's dtype, then
    silu and the product rounded as the eager ops round); amax holds P partial absmaxes of each h
    row (one per program), for act_quant_from_amax: the next W4A8 linear's int8 activations
    without a SwiGLU kernel or a pass over h before quantizing.
    """
    from lowbit.kernels.w4a8.gemv_stream import stream, stream_programs

    m = x.shape[0]
    n = packed.shape[0]
    x, words, scale, bias, group = _stream_operands(x, packed, scale, bias, group_size, "w4a8_gemv_swiglu")
    if n % 2:
        raise ValueError(f"w4a8_gemv_swiglu: the packed weight has {n} rows, not [gate; up] (2F, K/2)")
    norm_in = _stream_norm(x, norm, "w4a8_gemv_swiglu")
    h = torch.empty((m, n // 2), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        _norm_h_only(norm_in, x)
        return h, torch.zeros((m, 1), dtype=torch.float32, device=x.device)
    amax = torch.empty((m, stream_programs(x, n, config)), dtype=torch.float32, device=x.device)
    stream(x, words, scale, bias, h, group, config, amax, norm=norm_in)
    return h, amax


def w4a8_gemv_rope_cache(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                         bias: torch.Tensor | None, group_size: int, cos: torch.Tensor, sin: torch.Tensor,
                         pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n_q: int, n_k: int, t: int,
                         config: dict | None = None, norm: NormIn | None = None) -> torch.Tensor:
    """The decode attention input of a W4A8 [q; k; v] projection for M = B x t <= 4 tokens, on the
    streaming GEMV: x (M, K) fp16/bf16, packed ((n_q + 2 n_k) * D, K/2) -> the rotated q
    (B, t, n_q, D) in x's dtype; the rotated k and the v are written into the static caches kc / vc
    (B, n_k, S, D) at positions pos (t,) (none outside [0, S)), cos / sin (t, D) rows of those
    positions.

    Equals rope.rope_cache_update(w4a8_gemv_dp4a(x, ...).view(B, t, -1), cos, sin, pos, kc, vc,
    n_q, n_k): the GEMV outputs rounded to x's dtype, then RoPE rounded as that kernel rounds.
    """
    from lowbit.kernels.rope import check_rope_cache
    from lowbit.kernels.w4a8.gemv_stream import RopeCache, stream

    m = x.shape[0]
    n = packed.shape[0]
    what = "w4a8_gemv_rope_cache"
    x, words, scale, bias, group = _stream_operands(x, packed, scale, bias, group_size, what)
    if t < 1 or m % t:
        raise ValueError(f"w4a8_gemv_rope_cache: {m} token rows are not B x t for t={t}")
    d = check_rope_cache(what, m // t, t, n, x.dtype, cos, sin, pos, kc, vc, n_q, n_k)
    norm_in = _stream_norm(x, norm, what)
    q = torch.empty((m // t, t, n_q, d), dtype=x.dtype, device=x.device)
    if m == 0:
        return q
    rope = RopeCache(cos.contiguous(), sin.contiguous(), pos.contiguous(), kc, vc, n_q, n_k, t)
    stream(x, words, scale, bias, q.view(m, n_q * d), group, config, rope=rope, norm=norm_in)
    return q
