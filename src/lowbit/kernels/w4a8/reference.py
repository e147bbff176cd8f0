"""Pure-PyTorch references for the W4A8 / int4 kernels (same signatures as the launchers).

These are what the Triton kernels are tested against, and the REFERENCE path.
"""

from __future__ import annotations

import torch

from lowbit.core.packing import unpack_int4
from lowbit.core.primitives import quantize_per_token_sym
from lowbit.core.qtype import INT8_SYM
from lowbit.formats.common import int_group_dot


def act_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (q int8 (M, K) in [-127, 127], scale float32 (M, 1))."""
    return quantize_per_token_sym(x, INT8_SYM)


def permute_k(q: torch.Tensor) -> torch.Tensor:
    """Reference for act_quant(permute=True)'s layout: per 128-chunk, evens then odds."""
    *lead, k = q.shape
    return q.reshape(*lead, k // 128, 64, 2).transpose(-1, -2).reshape(*lead, k)


def unpack_ref(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) int8."""
    return unpack_int4(packed)


def int8_gemm_ref(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y = sa * sum_g sw[:, g] * (qa_g . qw_g) (+ bias); qw int8 (N, K), sw (N, G)."""
    acc = int_group_dot(qa, qw, group_size, 128)  # (G, M, N), exact
    y = (acc.to(torch.float32) * sw.to(torch.float32).t().unsqueeze(1)).sum(0) * sa
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def w4_decode_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
                  quantize_activations: bool) -> torch.Tensor:
    """Small-M GEMM from packed int4.

    quantize_activations=True: W4A8 numerics (int8 per-token x int4, exact group dots).
    False: weight-only numerics, w = q * scale (+ zero) rounded to x.dtype, fp32 accumulation.
    """
    q = unpack_int4(packed)
    if quantize_activations:
        qa, sa = act_quant_ref(x)
        return int8_gemm_ref(qa, sa, q, scale, bias, group_size, x.dtype)
    n, k = q.shape
    w = q.to(torch.float32).reshape(n, k // group_size, group_size) * scale.float().unsqueeze(-1)
    if zero is not None:
        w = w + zero.float().unsqueeze(-1)
    w = w.reshape(n, k).to(x.dtype)
    y = x.to(torch.float32) @ w.to(torch.float32).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def norm_gemv_ref(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm folded into the W4A8 GEMV (gemv_dp4a.NormIn): h = x + delta rounded to x's dtype
    (h = x without delta); v = h * weight in float32, quantized per token to int8; exact integer
    dots; r = 1 / sqrt(mean(h^2) + eps) applied with the activation scale. Returns (h, y)."""
    h = x if delta is None else (x.to(torch.float32) + delta.to(torch.float32)).to(x.dtype)
    hf = h.to(torch.float32)
    r = 1.0 / torch.sqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    qa, sa = act_quant_ref(hf * weight.to(torch.float32))
    return h, int8_gemm_ref(qa, sa * r, unpack_int4(packed), scale, bias, group_size, x.dtype)
