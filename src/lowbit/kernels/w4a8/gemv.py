"""CUDA-core GEMV from packed int4 weights for the smallest token counts (M <= 4).

    y (M, N) = x (M, K) @ W^T,    Wp (N, K/2) bytes, byte j = [ w[2j+1] | w[2j] ]

No tensor cores: at M <= 4 a tensor-core tile wastes >= 75% of its rows and its
operand layout shuffles cost more than the math. Each program owns BLOCK_N weight
rows, streams BLOCK_N x BLOCK_K/2 bytes per step, splits nibbles with two shifts
and multiplies them by the even / odd activation columns (a (BLOCK_M, BLOCK_N,
BLOCK_K/2) broadcast), accumulating per element; one reduction at the end.

QUANT_A=True fuses W4A8's activation quantization: every program computes the
per-token absmax of its (tiny, L2-resident) activation rows in a prologue, then
quantizes on the fly with IEEE division and half-to-even rounding -- the same
int8 values the reference produces -- and multiplies integers exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.w4a8.act_quant import _int8_round_clamp, _int8_scale

GEMV_MAX_M = 4


@triton.jit
def _w4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, QUANT_A: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # -- tile mapping ------------------------------------------------------------------
    # NOTE: Triton only software-pipelines loads that feed tl.dot, so this loop gets its
    # memory parallelism from wide tiles instead: BLOCK_N x BLOCK_K/2 bytes per step (8-16 KB).
    pid = tl.program_id(0)
    rows_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrap: no masks in the K loop
    rows_m = tl.arange(0, BLOCK_M) % M
    offs_j = tl.arange(0, BLOCK_K // 2)
    x_rows = x_ptr + rows_m[:, None] * stride_xm  # (BM, 1)
    w_rows = w_ptr + rows_n[:, None] * stride_wn  # (BN, 1)
    NG: tl.constexpr = BLOCK_K // GROUP if GROUP != 0 else 1
    GH: tl.constexpr = BLOCK_K // 2 // NG  # bytes per group inside a tile
    # -- prologue: per-token scale (W4A8) ------------------------------------------------
    if QUANT_A:
        amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :]).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        sa = _int8_scale(tl.max(amax, axis=1))
    if GROUP == 0:
        s_row = tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)
        if HAS_ZERO:
            z_row = tl.load(z_ptr + rows_n * stride_sn).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # -- K loop --------------------------------------------------------------------------
    for k0 in range(0, K, BLOCK_K):
        p = tl.load(w_rows + (k0 // 2 + offs_j)[None, :])  # (BN, BK/2) int8
        lo = ((p << 4) >> 4).to(tl.float32)
        hi = (p >> 4).to(tl.float32)
        xx = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :]).to(tl.float32)
        if QUANT_A:
            xx = _int8_round_clamp(xx, sa[:, None])
        xe, xo = tl.split(tl.reshape(xx, (BLOCK_M, BLOCK_K // 2, 2)))  # even / odd columns
        if GROUP != 0:  # scale (and zero) per group: view the tile as (BN, NG, GH)
            sw = tl.load(s_ptr + rows_n[:, None] * stride_sn + (k0 // GROUP + tl.arange(0, NG))[None, :])
            sw = sw.to(tl.float32)
        if QUANT_A:
            if GROUP != 0:
                lo = tl.reshape(tl.reshape(lo, (BLOCK_N, NG, GH)) * sw[:, :, None], (BLOCK_N, BLOCK_K // 2))
                hi = tl.reshape(tl.reshape(hi, (BLOCK_N, NG, GH)) * sw[:, :, None], (BLOCK_N, BLOCK_K // 2))
            prod = xe[:, None, :] * lo[None, :, :] + xo[:, None, :] * hi[None, :, :]
            acc += tl.sum(prod, axis=2)
        else:
            # weight-only: w = q * s (+ z) rounded to the activation dtype, as the reference does
            if GROUP != 0:
                wl = tl.reshape(lo, (BLOCK_N, NG, GH)) * sw[:, :, None]
                wh = tl.reshape(hi, (BLOCK_N, NG, GH)) * sw[:, :, None]
                if HAS_ZERO:
                    zw = tl.load(z_ptr + rows_n[:, None] * stride_sn
                                 + (k0 // GROUP + tl.arange(0, NG))[None, :]).to(tl.float32)
                    wl += zw[:, :, None]
                    wh += zw[:, :, None]
                wl = tl.reshape(wl, (BLOCK_N, BLOCK_K // 2))
                wh = tl.reshape(wh, (BLOCK_N, BLOCK_K // 2))
            else:
                wl = lo * s_row[:, None]
                wh = hi * s_row[:, None]
                if HAS_ZERO:
                    wl += z_row[:, None]
                    wh += z_row[:, None]
            wl = wl.to(x_ptr.dtype.element_ty).to(tl.float32)
            wh = wh.to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.sum(xe[:, None, :] * wl[None, :, :] + xo[:, None, :] * wh[None, :, :], axis=2)
    # -- epilogue ------------------------------------------------------------------------
    if QUANT_A:
        if GROUP == 0:
            acc = acc * s_row[None, :]
        acc = acc * sa[:, None]
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def gemv_config(m: int, n: int, k: int, group: int) -> dict:
    # NOTE: swept on H100 (benchmarks/tune_w4a8.py, results/tune_w4a8_h100.json): 8 rows x 1024-2048
    # K per step won on every Llama shape; narrower tiles starve the loop of bytes in flight.
    sizes = (2048, 1024, 512, 256, 128, 64, 32)
    block_k = next(b for b in sizes if k % b == 0 and (not group or b % group == 0))
    return dict(BLOCK_N=8, BLOCK_K=block_k, num_warps=4, num_stages=1)


def w4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            bias: torch.Tensor | None, group_size: int, quantize_activations: bool,
            config: dict | None = None) -> torch.Tensor:
    """x (M <= 4, K) fp16/bf16/fp32 -> (M, N) in x.dtype."""
    m, k = x.shape
    n = packed.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"the GEMV kernel takes at most {GEMV_MAX_M} tokens, got {m}")
    if packed.shape[1] * 2 != k:
        raise ValueError(f"packed weight K={packed.shape[1] * 2} does not match activation K={k}")
    group = 0 if group_size >= k else group_size
    cfg = dict(config or gemv_config(m, n, k, group))
    if group and cfg["BLOCK_K"] % group:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} must be a multiple of group_size={group}")
    if k % cfg["BLOCK_K"]:
        raise ValueError(f"K={k} must be a multiple of BLOCK_K={cfg['BLOCK_K']} for the GEMV kernel")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dummy = scale
    _w4_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, packed.view(torch.int8), scale, zero if zero is not None else dummy,
        bias if bias is not None else dummy, out, m, n, k, x.stride(0), packed.stride(0), scale.stride(0),
        out.stride(0), GROUP=group, QUANT_A=quantize_activations, HAS_ZERO=zero is not None,
        HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m), **cfg,
    )
    return out
