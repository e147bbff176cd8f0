"""One-pass kernels for the decoder's elementwise and row-wise steps at prefill (RoPE and the
KV-cache write: lowbit.kernels.rope).

In eager mode RMSNorm, RoPE and SwiGLU are chains of small torch ops, each a full pass over an
(tokens x dim) activation in HBM (RMSNorm alone: float cast, square, mean, multiply, cast,
multiply). At an 8192-token prompt these passes cost as much as a large GEMM. Each kernel here
reads its input once and writes its output once, with the roundings of the eager chain (results
agree with it to within one or two rounding steps on odd elements: reduction order, exp/rsqrt):

  rms_norm   y = w * bf(x * rsqrt(mean(x^2) + eps))       (fp32 statistics, as the eager module)
  add_rms_norm  h = bf(x + r), y = rms_norm(h)            (the residual add folded into the next norm)
  swiglu     h = bf(bf(silu(g)) * u)                        (F.silu rounds, then the product)

The `_quant` variants write what a W4A8 linear consumes instead of the bf16/fp16 tensor: the
per-token int8 quantization of y (h) with its fp32 scale (absmax / 127, IEEE division,
half-to-even), so quantizing inside the producer skips one write and one read of the activation
and the act-quant launch. For SwiGLU these are the integers of act_quant(swiglu(gu)); for RMSNorm,
compiled for a GPU, the int8 variant's fp32 sum of squares may add in another order than the bf16
variant's (Triton picks the row layout per kernel), so a rare element lands one integer away
(8 and 15 of 16.8M at 4096 x 4096, fp16 / bf16, on the H100: results/fused_quant_mismatch_h100.txt).

Every launch passes enable_fp_fusion=False: Triton turns `(a * b).to(bf16)` followed by an add
into one bf16 FMA (one rounding instead of the eager chain's two), which gives a different --
in a cancellation, a very different -- result (seen on the H100 for RoPE, lowbit.kernels.rope,
before this flag).

Pure-torch references: lowbit.llm.model (the eager modules) and act_quant's reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.w4a8.act_quant import _int8_round_clamp, _int8_scale, empty_quantized


# -- RMSNorm (+ per-token int8 quantization) ----------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, s_ptr, r_ptr, h_ptr, K, stride_x, stride_out, stride_r, stride_h,
                     eps, BLOCK_K: tl.constexpr, QUANT: tl.constexpr, HAS_RES: tl.constexpr):
    # out: the normalized row (x's dtype), or with QUANT its int8 quantization (+ scale in s).
    # HAS_RES: the row normalized is h = x + r, rounded to x's dtype as torch's add rounds, and
    # h is stored too (the residual stream's next value).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + offs, x, mask=mask)
    x = x.to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / K + eps)
    h = (x * r).to(w_ptr.dtype.element_ty).to(tl.float32)  # the eager module rounds before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (w * h).to(w_ptr.dtype.element_ty)
    if QUANT:
        yf = y.to(tl.float32)
        scale = _int8_scale(tl.max(tl.abs(yf), axis=0))
        tl.store(s_ptr + row, scale)
        tl.store(out_ptr + row * stride_out + offs, _int8_round_clamp(yf, scale).to(tl.int8), mask=mask)
    else:
        tl.store(out_ptr + row * stride_out + offs, y, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_norm(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape[-1] != weight.numel() or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: x (..., {x.shape[-1]}) {x.dtype} needs a ({x.shape[-1]},) weight of "
                         f"the same dtype, got {tuple(weight.shape)} {weight.dtype}")
    if x.shape[-1] > 16384:
        raise ValueError(f"rms_norm keeps a row in registers: dim <= 16384, got {x.shape[-1]}")


def _norm_launch(x2: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                 s: torch.Tensor | None, r2: torch.Tensor | None = None,
                 h: torch.Tensor | None = None) -> None:
    """out: (M, K) in x's dtype, or int8 with s (M, 1) fp32 for the quantized variant; with r2, the
    rows normalized are h = x2 + r2 (written to h)."""
    block = max(triton.next_power_of_2(x2.shape[1]), 128)
    if r2 is not None and h is not None:
        rr, hh, has_res = r2, h, True
    else:  # the residual pointers go unused
        rr, hh, has_res = x2, x2, False
    _rms_norm_kernel[(x2.shape[0],)](
        x2, weight, out, s if s is not None else weight, rr, hh, x2.shape[1], x2.stride(0), out.stride(0),
        rr.stride(0), hh.stride(0), eps, BLOCK_K=block, QUANT=s is not None, HAS_RES=has_res,
        num_warps=4 if block <= 2048 else 8, enable_fp_fusion=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., K) -> (..., K) in x's dtype."""
    _check_norm(x, weight)
    x2 = _rows(x)
    y = torch.empty_like(x2)
    if x2.shape[0]:
        _norm_launch(x2, weight.contiguous(), eps, y, None)
    return y.view(x.shape)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> (q int8 (M, K), scale float32 (M, 1)) with M = tokens: act_quant(rms_norm(x))."""
    _check_norm(x, weight)
    x2 = _rows(x)
    q, s = empty_quantized(x2.shape[0], x2.shape[1], x.device)
    if x2.shape[0]:
        _norm_launch(x2, weight.contiguous(), eps, q, s)
    return q, s


def _check_res(x: torch.Tensor, r: torch.Tensor) -> None:
    if r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: the residual must match x ({tuple(x.shape)} {x.dtype}), got "
                         f"{tuple(r.shape)} {r.dtype}")


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + r (both (..., K) in x's dtype): the residual add and the next
    norm in one pass."""
    _check_norm(x, weight)
    _check_res(x, r)
    x2, r2 = _rows(x), _rows(r)
    h, y = torch.empty_like(x2), torch.empty_like(x2)
    if x2.shape[0]:
        _norm_launch(x2, weight.contiguous(), eps, y, None, r2, h)
    return h.view(x.shape), y.view(x.shape)


def add_rms_norm_quant(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, q, scale) with h = x + r and (q, scale) = act_quant(rms_norm(h)) (M = tokens rows)."""
    _check_norm(x, weight)
    _check_res(x, r)
    x2, r2 = _rows(x), _rows(r)
    h = torch.empty_like(x2)
    q, s = empty_quantized(x2.shape[0], x2.shape[1], x.device)
    if x2.shape[0]:
        _norm_launch(x2, weight.contiguous(), eps, q, s, r2, h)
    return h.view(x.shape), q, s


# -- SwiGLU (+ per-token int8 quantization) -----------------------------------------------
@triton.jit
def _silu_mul(g, u, OUT_DTYPE: tl.constexpr):
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(OUT_DTYPE)  # F.silu rounds to the tensor dtype
    return (a.to(tl.float32) * u.to(tl.float32)).to(OUT_DTYPE)


@triton.jit
def _swiglu_kernel(gu_ptr, h_ptr, F, stride_gu, stride_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    g = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + F + offs, mask=mask, other=0.0)
    tl.store(h_ptr + row * stride_h + offs, _silu_mul(g, u, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_quant_kernel(gu_ptr, q_ptr, s_ptr, F, stride_gu, stride_q, OUT_DTYPE: tl.constexpr,
                         BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    # ONE_PASS (BLOCK >= F): the row stays in registers; else an absmax pass, then quantize (the
    # second read of the row, 2 x F values, hits L2)
    row = tl.program_id(0).to(tl.int64)
    base = gu_ptr + row * stride_gu
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        mask = offs < F
        h = _silu_mul(tl.load(base + offs, mask=mask, other=0.0),
                      tl.load(base + F + offs, mask=mask, other=0.0), OUT_DTYPE).to(tl.float32)
        scale = _int8_scale(tl.max(tl.abs(h), axis=0))
        tl.store(s_ptr + row, scale)
        tl.store(q_ptr + row * stride_q + offs, _int8_round_clamp(h, scale).to(tl.int8), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for f0 in range(0, F, BLOCK):
            offs = f0 + tl.arange(0, BLOCK)
            mask = offs < F
            h = _silu_mul(tl.load(base + offs, mask=mask, other=0.0),
                          tl.load(base + F + offs, mask=mask, other=0.0), OUT_DTYPE)
            amax = tl.maximum(amax, tl.abs(h.to(tl.float32)))
        scale = _int8_scale(tl.max(amax, axis=0))
        tl.store(s_ptr + row, scale)
        for f0 in range(0, F, BLOCK):
            offs = f0 + tl.arange(0, BLOCK)
            mask = offs < F
            h = _silu_mul(tl.load(base + offs, mask=mask, other=0.0),
                          tl.load(base + F + offs, mask=mask, other=0.0), OUT_DTYPE)
            tl.store(q_ptr + row * stride_q + offs, _int8_round_clamp(h.to(tl.float32), scale).to(tl.int8),
                     mask=mask)


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _check_gu(gu: torch.Tensor) -> int:
    if gu.shape[-1] % 2 or gu.dtype not in _TL_DTYPE:
        raise ValueError(f"swiglu takes (..., 2F) [gate; up] in fp16/bf16/fp32, got {tuple(gu.shape)} "
                         f"{gu.dtype}")
    return gu.shape[-1] // 2


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """(..., 2F) [gate; up] -> silu(gate) * up (..., F), rounded as the eager ops round."""
    f = _check_gu(gu)
    g2 = _rows(gu)
    h = torch.empty((g2.shape[0], f), dtype=gu.dtype, device=gu.device)
    if g2.shape[0]:
        block = 1024
        _swiglu_kernel[(g2.shape[0], triton.cdiv(f, block))](g2, h, f, g2.stride(0), h.stride(0),
                                                             BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return h.view(*gu.shape[:-1], f)


def swiglu_quant(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 2F) -> (q int8 (M, F), scale float32 (M, 1)): act_quant(swiglu(gu)) in one kernel."""
    f = _check_gu(gu)
    g2 = _rows(gu)
    q, s = empty_quantized(g2.shape[0], f, gu.device)
    if g2.shape[0]:
        block, one_pass, warps = swiglu_quant_launch(f, g2.shape[0])
        _swiglu_quant_kernel[(g2.shape[0],)](g2, q, s, f, g2.stride(0), q.stride(0),
                                             OUT_DTYPE=_TL_DTYPE[gu.dtype], BLOCK=block, ONE_PASS=one_pass,
                                             num_warps=warps, enable_fp_fusion=False)
    return q, s


# NOTE: H100, one token of Llama-2-7B's SwiGLU (F = 11008) into the down projection's gemv_q, CUDA-graph
# replays with L2 flushed (benchmarks/probe_long_row.py): with the row walked in 4096-wide chunks
# twice (one program per row, six dependent load rounds), SwiGLU-with-quantization + gemv_q took
# 28.1 us against 27.2 for the plain SwiGLU + the streaming GEMV (results/probe_long_row_twopass_
# swiglu_h100.json); holding the row in registers (one load round, like act_quant_launch for long
# rows) took it to 24.6 vs 27.0 (results/probe_long_row_h100.json, sha 14a271e). Still 6.6 us per
# call averaged over a profiled prefill and decode steps (results/profile_decode_w4a8_b1_cudagraph_
# addnorm_h100.txt): one program computes the silu and the IEEE division of all 11008 values.
def swiglu_quant_launch(f: int, m: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) for m rows of F outputs."""
    if m < 64 and f <= 16384:
        block = max(triton.next_power_of_2(f), 128)
        return block, True, 4 if block <= 2048 else (8 if block <= 8192 else 16)
    block = min(max(triton.next_power_of_2(f), 128), 4096)
    return block, block >= f, 8 if block >= 4096 else 4


__all__ = ["rms_norm", "rms_norm_quant", "add_rms_norm", "add_rms_norm_quant", "swiglu", "swiglu_quant"]
