"""Weight-read-bound GEMM from packed int4 weights, for small token counts (decode).

    y (M, N) = x (M, K) @ W^T,  W (N, K) stored packed:  Wp (N, K/2) bytes

    Wp row n:  [ w1|w0 ][ w3|w2 ][ w5|w4 ] ...     (high nibble | low nibble)
    a program owns BLOCK_N rows of Wp and a K range (split-K); per K tile it loads
    BLOCK_N x SUB_K/2 bytes, splits them with two shifts into the even-k (lo) and
    odd-k (hi) halves and multiplies them by the even/odd columns of x:

        y += x[:, 0::2] @ lo^T + x[:, 1::2] @ hi^T          (two tensor-core dots)

Two numerics, one kernel (A_INT8 constexpr):
  A_INT8=True   W4A8: x pre-quantized per token (int8, scale sa); int32 dots per
                group, float epilogue  y = sa * sum_g s[n, g] * dot_g.
  A_INT8=False  weight-only: w = q * s (+ zero) rounded to x.dtype in registers,
                fp32 accumulation (what the reference does: dequantize, then matmul).
M is padded to a 16-row tile (tensor-core minimum); at M=1 the dots are cheap and
the kernel is bound by reading Wp. Split-K partials are summed with fp32 atomics
into a zeroed workspace and cast by a small finalize kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w4_decode_kernel(
    a_ptr, sa_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_wn, stride_sn, stride_om,
    GROUP: tl.constexpr, A_INT8: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC_OUT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
):
    # -- tile mapping: axis 0 = (m block, n block), axis 1 = K split ---------------------
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    # Rows past M / N wrap around so the K loop needs no row masks (stores are masked).
    rows_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rows_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_j = tl.arange(0, SUB_K // 2)  # byte column inside a sub tile
    offs_k = tl.arange(0, SUB_K)  # activation column inside a sub tile
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)

    # -- pointers ---------------------------------------------------------------------
    a_rows = a_ptr + rows_m[:, None] * stride_am
    w_rows = w_ptr + rows_n[:, None] * stride_wn
    s_rows = s_ptr + rows_n * stride_sn
    if GROUP == 0:  # per-row scale: one load
        s_row = tl.load(s_rows).to(tl.float32)
        if HAS_ZERO:
            z_row = tl.load(z_ptr + rows_n * stride_sn).to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    # -- K loop: BLOCK_K per iteration, SUB_K (= one scale group) per dot pair ---------------
    for k0 in range(k_begin, k_end, BLOCK_K):
        for sub in tl.static_range(BLOCK_K // SUB_K):
            kk = k0 + sub * SUB_K
            if EVEN_K:
                p = tl.load(w_rows + (kk // 2 + offs_j)[None, :])
                a = tl.load(a_rows + (kk + offs_k)[None, :])
            else:
                p = tl.load(w_rows + (kk // 2 + offs_j)[None, :],
                            mask=(kk + 2 * offs_j < k_end)[None, :], other=0)
                a = tl.load(a_rows + (kk + offs_k)[None, :], mask=(kk + offs_k < k_end)[None, :],
                            other=0)
            lo = (p << 4) >> 4  # even k, sign-extended
            hi = p >> 4  # odd k
            a_ev, a_od = tl.split(tl.reshape(a, (BLOCK_M, SUB_K // 2, 2)))
            if GROUP != 0:
                g = kk // GROUP
                if EVEN_K:
                    s_g = tl.load(s_rows + g).to(tl.float32)
                else:  # a sub tile past k_end has no group: its scale would be read out of bounds
                    g_ok = (rows_n * 0 + kk) < k_end
                    s_g = tl.load(s_rows + g, mask=g_ok, other=0.0).to(tl.float32)
            if A_INT8:
                d = tl.dot(a_ev, tl.trans(lo), out_dtype=tl.int32)
                d = tl.dot(a_od, tl.trans(hi), acc=d, out_dtype=tl.int32)
                if GROUP != 0:
                    acc += d.to(tl.float32) * s_g[None, :]
                else:
                    acc_i += d
            else:
                if GROUP != 0:
                    s_use = s_g
                    if HAS_ZERO:
                        if EVEN_K:
                            z_use = tl.load(z_ptr + rows_n * stride_sn + g).to(tl.float32)
                        else:
                            z_use = tl.load(z_ptr + rows_n * stride_sn + g, mask=g_ok, other=0.0)
                            z_use = z_use.to(tl.float32)
                else:
                    s_use = s_row
                    if HAS_ZERO:
                        z_use = z_row
                w_lo = lo.to(tl.float32) * s_use[:, None]
                w_hi = hi.to(tl.float32) * s_use[:, None]
                if HAS_ZERO:
                    w_lo += z_use[:, None]
                    w_hi += z_use[:, None]
                acc = tl.dot(a_ev, tl.trans(w_lo.to(a_ev.dtype)), acc=acc)
                acc = tl.dot(a_od, tl.trans(w_hi.to(a_od.dtype)), acc=acc)

    # -- epilogue: scales, bias, store (or atomically add a split-K partial) ---------------
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if A_INT8:
        if GROUP == 0:
            acc = acc_i.to(tl.float32) * s_row[None, :]
        sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
        acc = acc * sa[:, None]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC_OUT:
        tl.atomic_add(out_ptrs, acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _finalize_kernel(ws_ptr, bias_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    v = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def decode_config(m: int, n: int, k: int, group: int) -> dict:
    """Launch config for the tensor-core decode kernel (M up to a few hundred).

    NOTE: swept on H100 (benchmarks/tune_w4a8.py): BLOCK_N=32 with 512-wide K steps won at
    M=16 on every Llama shape (e.g. 12288x4096: 29.4 us vs 35-50 us for BLOCK_N 64/128);
    split-K only pays when N is small (1024x4096: 12.6 us with 4 splits). At N=4096 one split
    wins (results/tune_decode16_h100.json, act quant included: 4096x4096 18.5 us vs 22.2 with
    2 splits), and K must be a whole number of K steps: K=11008 takes 256-wide steps (40.0 us)
    where 512-wide ones run the masked loop (100.3 us; 68.0 with 2 masked splits).
    """
    sub_k = group if group else 128
    block_k = max(sub_k, 512)
    if k % block_k and k % 256 == 0 and sub_k <= 256:
        block_k = 256
    split_k = 4 if n <= 2048 else 1
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, SUB_K=sub_k, SPLIT_K=split_k,
                num_warps=4, num_stages=4 if block_k == 256 else 3)


def w4_decode(x: torch.Tensor, sa: torch.Tensor | None, packed: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor | None, bias: torch.Tensor | None, group_size: int,
              out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """x (M, K): int8 (then sa (M, 1) float32 is required) or fp16/bf16/fp32.

    packed (N, K/2) uint8; scale (N, G); zero (N, G) float or None; group_size == K means per row.
    """
    m, k = x.shape
    n = packed.shape[0]
    a_int8 = x.dtype == torch.int8
    if a_int8 and sa is None:
        raise ValueError("int8 activations need their per-token scales (sa)")
    if packed.shape[1] * 2 != k:
        raise ValueError(f"packed weight K={packed.shape[1] * 2} does not match activation K={k}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    group = 0 if group_size >= k else group_size
    cfg = dict(config or decode_config(m, n, k, group))
    if group and cfg["SUB_K"] != group:
        raise ValueError(f"SUB_K={cfg['SUB_K']} must equal group_size={group}")
    if k % 32:
        raise ValueError(f"the int4 decode kernel needs K divisible by 32, got K={k}")
    if a_int8 and group and group < 64:
        # NOTE: int8 tensor-core MMAs take K >= 32 per instruction; a 32-wide group gives 16-wide dots.
        raise ValueError(f"the int8 decode kernel needs group_size >= 64, got {group} (use the GEMM path)")
    if a_int8 and not group and k < 64:
        raise ValueError(f"the int8 decode kernel needs K >= 64 per row, got K={k} (use the GEMM path)")
    if not group and cfg["SUB_K"] > k:
        # int8 MMAs take K >= 32 per instruction: the even/odd halves of a 64-wide step
        cfg["SUB_K"] = cfg["BLOCK_K"] = 64 if a_int8 else 32
    if max(m, n) * k >= 2**31:
        raise ValueError(f"decode kernel offsets are int32: M*K and N*K must be < 2**31 (K={k})")
    split_k = cfg.pop("SPLIT_K")
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split_k = triton.cdiv(k, k_per_split)
    atomic = split_k > 1
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    target = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else out
    dummy = scale
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _w4_decode_kernel[grid](
        x, sa if sa is not None else dummy, packed.view(torch.int8), scale,
        zero if zero is not None else dummy, bias if bias is not None else dummy, target,
        m, n, k, k_per_split, x.stride(0), packed.stride(0), scale.stride(0), target.stride(0),
        GROUP=group, A_INT8=a_int8, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        # every split (the last, shorter one too) is whole K steps when K and the split length are
        ATOMIC_OUT=atomic, EVEN_K=k % cfg["BLOCK_K"] == 0 and k_per_split % cfg["BLOCK_K"] == 0, **cfg,
    )
    if atomic:
        block = 1024
        _finalize_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else dummy, out, m, n, HAS_BIAS=bias is not None,
            BLOCK=block,
        )
    return out


__all__ = ["w4_decode", "decode_config"]
