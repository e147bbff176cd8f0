"""torch.library custom ops for int4 weights, and the token-count routing.

One stored weight (packed int4 + scales), several execution paths chosen by the
token count M (product of the activation's leading dims):

  W4A8 (quantize_activations=True)
    M <= 4                    dp4a GEMV (integer dot instructions), activation quantization fused
                              (M = 1 into a per-row weight with K > LONG_ROW_MIN_K, and M = 2-4
                              with rows too long for the streaming GEMV: act_quant, or the
                              producer of x quantizing, then the pre-quantized dp4a GEMV,
                              gemv_q.py; see _dp4a_takes)
    M <  W4A8_PREFILL_MIN_M   act_quant (1 pass) + decode kernel (int8 x int4 dots)
    M >= W4A8_PREFILL_MIN_M   act_quant and the int4 -> int8 workspace expansion in one launch,
                              then the int8 GEMM (TMA operand loads on Hopper, per-row weights)
  weight-only (quantize_activations=False)
    M <= 2 (narrow layers)    CUDA-core GEMV
    M <  WO_PREFILL_MIN_M     decode kernel (dequantize in registers, fp dots)
    M >= WO_PREFILL_MIN_M     dequantize into a workspace + cuBLAS GEMM

The ops have fake implementations, so torch.compile(fullgraph=True) and CUDA
graphs see them as single opaque nodes.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.kernels import dispatches_op, needs_grad

# NOTE: crossovers measured on H100 (benchmarks/tune_w4a8.py, bench_linear.py; docs/kernels.md).
# At M=16 the decode kernel wins (12288x4096: 29 us + 7 us act quant); at M=128 it re-reads the
# weight per 16-row tile (12288x4096: 186 us) while unpack + int8 GEMM takes 73 us.
W4A8_PREFILL_MIN_M = 64
WO_PREFILL_MIN_M = 64
# Weight-only: CUDA-core GEMV for one or two tokens on narrow layers: 4096x4096 M=1 15.0 us vs
# 17.2 us for the tensor-core decode kernel; at 22016x4096 they tie (48.8 vs 49.9 us), so wide
# layers keep the decode kernel (results/tune_w4a8_h100.json, tune_w4a8_first_h100.json).
GEMV_MAX_M = 2
GEMV_MAX_N = 12288

PATHS = ("auto", "gemv", "decode", "prefill")


def _zero_as_float(zero: Optional[torch.Tensor], scale: torch.Tensor, int_zero: bool
                   ) -> Optional[torch.Tensor]:
    if zero is None:
        return None
    if int_zero:  # (q - zp) * s == q * s + (-zp * s)
        return (-zero.to(torch.float32) * scale.to(torch.float32)).to(scale.dtype)
    return zero


def _int4_linear_impl(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                      zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], group_size: int,
                      int_zero: bool, quantize_activations: bool, path: str) -> torch.Tensor:
    from lowbit.kernels.w4a8.act_quant import act_quant
    from lowbit.kernels.w4a8.decode import w4_decode
    from lowbit.kernels.w4a8.expand import dequant_int4_triton
    from lowbit.kernels.w4a8.gemv import w4_gemv

    m, n = x.shape[0], packed.shape[0]
    zf = _zero_as_float(zero, scale, int_zero)
    from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a

    if quantize_activations and zf is None and _dp4a_takes(m, x.shape[1], group_size, path):
        return w4a8_gemv_dp4a(x, packed, scale, bias, group_size)
    gemv_ok = x.shape[1] % 32 == 0 and (group_size >= x.shape[1] or 2048 % group_size == 0)
    if path == "auto" and m <= GEMV_MAX_M and n <= GEMV_MAX_N and gemv_ok and not quantize_activations:
        return w4_gemv(x, packed, scale, zf, bias, group_size, quantize_activations)
    if path == "gemv":
        return w4_gemv(x, packed, scale, zf, bias, group_size, quantize_activations)
    if quantize_activations:
        if zf is not None:
            raise ValueError("the W4A8 kernels take symmetric int4 weights (no zero point)")
        if _w4a8_route(m, x.shape[1], group_size, path) == "prefill":
            from lowbit.kernels.w4a8.expand import quant_and_unpack
            from lowbit.kernels.w4a8.prefill import int8_gemm

            # activation quantization and the weight expansion in one launch
            qa, sa, w8 = quant_and_unpack(x, packed)  # w8: one-layer workspace, freed on return
            return int8_gemm(qa, sa, w8, scale, bias, group_size, x.dtype)
        qa, sa = act_quant(x)
        return _w4a8_linear_q_impl(qa, sa, packed, scale, bias, group_size, x.dtype, path)
    use_prefill = path == "prefill" or (path == "auto" and m >= WO_PREFILL_MIN_M)
    if use_prefill:
        w = dequant_int4_triton(packed, scale, zf, group_size, x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    return w4_decode(x, None, packed, scale, zf, bias, group_size, x.dtype)


# NOTE: H100, L2 flushed, CUDA-graph replays (results/probe_gemv_stream_m3_3db3150_h100.txt, before;
# results/probe_gemv_stream_m3_h100.json, after): at 2-4 tokens, rows too long for the streaming
# GEMV's registers (2 x next_pow2(K) > 16384 at M=2, i.e. K > 8192; 4 x next_pow2(K) at M=3-4,
# i.e. K > 4096) ran the blocked dp4a kernel, which reads the weight once per token: 4096x11008
# 73.6 / 112.2 / 128.7 us at M = 2 / 3 / 4 (bf16 47.5), against 25.8 / 32.1 / 32.4 for act_quant +
# the pre-quantized gemv_q; 4096x14336 41.2 / 48.7 / 71.2 vs 29.5 / 30.3 / 30.4. The blocked kernel
# lost at K=4096 too (4096x4096 M=3 / 4: 18.7 / 24.4 vs 14.0 / 14.2; 12288x4096: 42.2 / 48.0 vs
# 26.2 / 26.5); 4096 < K <= 8192 (e.g. 5120) was not measured. So from 2 tokens AUTO takes the
# dp4a GEMV only where it streams.
def _dp4a_takes(m: int, k: int, group_size: int, path: str) -> bool:
    """Whether M tokens of W4A8 run the dp4a GEMV, which quantizes in its prologue: paths "auto" and
    "gemv", up to DP4A_MAX_M tokens and the groups it takes; from 2 tokens "auto" only where the
    streamer holds the rows (else act_quant + _w4a8_route, which takes gemv_q: it accepts every
    group size the dp4a GEMV does). Eager calls and compiled graphs (quantizes_in_graph) both ask."""
    from lowbit.kernels.w4a8.gemv_dp4a import DP4A_MAX_M, dp4a_unsupported, stream_supported

    if m > DP4A_MAX_M or path not in ("auto", "gemv") or dp4a_unsupported(k, group_size) is not None:
        return False
    if path == "auto" and m == 1 and group_size >= k and k > LONG_ROW_MIN_K:
        return False  # one long per-row row: act_quant + gemv_q (LONG_ROW_MIN_K)
    return path == "gemv" or m == 1 or stream_supported(m, k, 0 if group_size >= k else group_size)


def w4a8_prefill_quantized(qa: torch.Tensor, sa: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                           bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype
                           ) -> torch.Tensor:
    """The W4A8 prefill path from activations already quantized per token (qa int8, sa fp32)."""
    from lowbit.kernels.w4a8.expand import unpack_int4_triton
    from lowbit.kernels.w4a8.prefill import int8_gemm

    w8 = unpack_int4_triton(packed)  # one-layer workspace, freed on return
    return int8_gemm(qa, sa, w8, scale, bias, group_size, out_dtype)


def _w4a8_route(m: int, k: int, group_size: int, path: str) -> str:
    """Which kernel takes M per-token int8 activation rows: "gemv_q", "prefill" or "decode"."""
    from lowbit.kernels.w4a8.gemv_q import gemv_q_unsupported

    if path in ("auto", "gemv") and gemv_q_unsupported(m, k, group_size) is None:
        return "gemv_q"
    # the int8 decode kernel's dots need >= 64 K per group (per row: K >= 64)
    small_group = min(group_size, k) < 64
    if path == "prefill" or (path == "auto" and (m >= W4A8_PREFILL_MIN_M or small_group)):
        return "prefill"
    return "decode"


def _w4a8_linear_q_impl(qa: torch.Tensor, sa: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype,
                        path: str) -> torch.Tensor:
    """W4A8 from per-token int8 activations (qa (M, K) int8, sa (M, 1) fp32): dp4a GEMV (M <= 4),
    decode kernel or GEMM."""
    from lowbit.kernels.w4a8.decode import w4_decode
    from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_q

    route = _w4a8_route(qa.shape[0], qa.shape[1], group_size, path)
    if route == "gemv_q":
        return w4a8_gemv_q(qa, sa, packed, scale, bias, group_size, out_dtype)
    if route == "prefill":
        return w4a8_prefill_quantized(qa, sa, packed, scale, bias, group_size, out_dtype)
    return w4_decode(qa, sa, packed, scale, None, bias, group_size, out_dtype)


int4_linear_op = torch.library.custom_op("lowbit::int4_linear", mutates_args=())(_int4_linear_impl)
w4a8_linear_q_op = torch.library.custom_op("lowbit::w4a8_linear_q", mutates_args=())(_w4a8_linear_q_impl)


@w4a8_linear_q_op.register_fake
def _(qa, sa, packed, scale, bias, group_size, out_dtype, path):
    return qa.new_empty((qa.shape[0], packed.shape[0]), dtype=out_dtype)


def quantizes_in_graph(m: object, k: int, group_size: int, symmetric: bool, path: str) -> bool:
    """True when a compiled W4A8 call with m tokens should take int8 activations: the graph then
    quantizes with act_quant_traceable, which Inductor fuses into the producer of the activations
    (RMSNorm, SwiGLU), and calls w4a8_linear_q. That is every M that would run act_quant and then
    an int8 kernel (including M = 1 with K > LONG_ROW_MIN_K for per-row weights, see _dp4a_takes).
    Never for symbolic token counts (the route depends on M). Eager producers ask the same
    (Int4Tensor.takes_prequantized)."""
    if not symmetric or not isinstance(m, int) or path == "gemv":
        return False
    return not _dp4a_takes(m, k, group_size, path)


# NOTE: one token into a per-row weight (Llama-2-7B, H100). The stream GEMV quantizes in its
# prologue but holds next_pow2(K) words per row tile: K=11008 runs as 16384 (19.8 us back to back)
# where the pre-quantized gemv_q walks K in chunks (11.7 us, results/decode_gemv_seqsweep_h100.json).
# Compiled decode step: Inductor's one-row RMSNorm + quant took 3.7-4.0 us, SwiGLU + quant 4.9 us in
# three kernels (results/profile_decode_w4a8_b1_gemvq_h100.txt) vs 2.1-2.8 us for the norm alone
# (profile_decode_w4a8_b1_h100.txt) and 1.3 us for SwiGLU alone (profile_decode_w4a8_b1_b16_h100.txt),
# so only K > 8192 (the down projection) pays for it: 11.7 + 3.6 = 15.3 vs 19.8 us. Eager, L2
# flushed, CUDA-graph replays (benchmarks/probe_long_row.py, results/probe_long_row_h100.json, sha
# 14a271e): 4096x11008 act_quant + gemv_q 22.2 us vs stream 24.6 (tinygemm 19.9), and behind the
# SwiGLU that produces the row, SwiGLU-with-quant + gemv_q 24.6 vs SwiGLU + stream 27.0; 4096x14336
# 25.5 vs 25.7 (26.7 vs 27.3). At K = 4096 the stream kernel stays ahead alone (4096x4096 11.1 vs
# 12.6, 22016x4096 26.9 vs 29.3) and about even behind a norm that quantizes (norm-with-quant +
# gemv_q vs norm + stream: 4096x4096 13.6 vs 14.0, 12288x4096 21.2 vs 21.6, 22016x4096 30.1 vs
# 29.7, 14336x4096 24.8 vs 23.3). Per row only: with g128 scales gemv_q lost on both long shapes
# (27.8 vs 26.1 us, 30.7 vs 26.4).
LONG_ROW_MIN_K = 8192


@int4_linear_op.register_fake
def _(x, packed, scale, zero, bias, group_size, int_zero, quantize_activations, path):
    return x.new_empty((x.shape[0], packed.shape[0]))


def int4_linear(x2: torch.Tensor, w, bias: torch.Tensor | None, quantize_activations: bool,
                path: str = "auto") -> torch.Tensor:
    """Entry point used by Int4Tensor: x2 (M, K) fp16/bf16 -> (M, N)."""
    from lowbit.core.qtype import ZeroPointDomain

    if path not in PATHS:
        raise ValueError(f"path={path!r}; allowed: {list(PATHS)}")
    args = (x2, w.qdata, w.scale, w.zero_point, bias, w.group_size,
            w.zero_point_domain is ZeroPointDomain.INT, quantize_activations, path)
    grad = needs_grad(x2, bias)
    if dispatches_op(x2, w.qdata, grad):
        if quantize_activations and not grad and quantizes_in_graph(
                x2.shape[0], x2.shape[1], w.group_size, w.zero_point is None, path):
            from lowbit.kernels.w4a8.act_quant import act_quant_traceable

            qa, sa = act_quant_traceable(x2)
            return w4a8_linear_q_op(qa, sa, w.qdata, w.scale, bias, w.group_size, x2.dtype, path)
        return int4_linear_op(*args)
    # NOTE: eager inference calls the implementation directly: the custom-op dispatcher adds
    # tens of microseconds per call, longer than a whole decode GEMV.
    return _int4_linear_impl(*args)


def _setup_context(ctx, inputs, output):
    x, packed, scale, zero, bias, group_size, int_zero, _, _ = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.meta = (group_size, int_zero, x.dtype, bias is not None)


def _backward(ctx, grad):
    """Gradient w.r.t. x and bias through the dequantized weight (weights are frozen)."""
    from lowbit.core.packing import unpack_int4

    packed, scale, zero = ctx.saved_tensors
    group_size, int_zero, dtype, has_bias = ctx.meta
    q = unpack_int4(packed).to(torch.float32)
    n, k = q.shape
    w = q.reshape(n, k // group_size, group_size) * scale.to(torch.float32).unsqueeze(-1)
    zf = _zero_as_float(zero, scale, int_zero)
    if zf is not None:
        w = w + zf.to(torch.float32).unsqueeze(-1)
    grad_x = (grad.to(torch.float32) @ w.reshape(n, k)).to(dtype)
    grad_b = grad.sum(0) if has_bias else None
    return grad_x, None, None, None, grad_b, None, None, None, None


int4_linear_op.register_autograd(_backward, setup_context=_setup_context)
