"""W4A8 prefill GEMM that reads the packed int4 weight directly (no workspace).

Computed transposed, so the int4 weight is the tensor-core *A* operand, which
Hopper's wgmma can take from registers: the nibble unpack (two shifts) happens in
registers on the way to the MMA, and the activation (B operand) streams through
shared memory untouched.

    C^T (N, M) = W (N, K) @ Xq^T (K, M)

    Wp row n, one 128-wide K chunk:  64 bytes  [w1|w0][w3|w2]...[w127|w126]
        lo nibbles -> w0 w2 ... w126   (BLOCK_N x 64)
        hi nibbles -> w1 w3 ... w127   (BLOCK_N x 64)
    Xq row m, same chunk (act_quant(permute=True)):  x0 x2 ... x126 | x1 x3 ... x127
    acc += lo @ Xq[:, chunk[:64]]^T + hi @ Xq[:, chunk[64:]]^T     (int32)

Group-wise scales (group a multiple of 128) convert each group's int32 sum; the
epilogue applies per-row weight scales, per-token scales and bias, and stores C.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.kernels import interpreter_enabled


@triton.jit
def _w4a8_swapped_kernel(
    p_ptr, s_ptr, x_ptr, sa_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_pn, stride_sn, stride_xm, stride_cm,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    # -- tile mapping (grouped along N so a band of weight tiles stays in L2) --------------
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_N * num_m
    first_n = (pid // width) * GROUP_N
    size_n = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % width) % size_n
    pid_m = (pid % width) // size_n
    rows_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rows_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_j = tl.arange(0, BLOCK_K // 2)
    # -- pointers ------------------------------------------------------------------------
    p_ptrs = p_ptr + rows_n[:, None] * stride_pn + offs_j[None, :]  # (BN, 64) bytes
    x_lo = x_ptr + rows_m[None, :] * stride_xm + offs_j[:, None]  # (64, BM), K-major
    x_hi = x_lo + BLOCK_K // 2
    acc_i = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # -- K loop: one 128-wide chunk per step ------------------------------------------------
    for k0 in range(0, K, BLOCK_K):
        p = tl.load(p_ptrs)
        lo = (p << 4) >> 4
        hi = p >> 4
        xl = tl.load(x_lo)
        xh = tl.load(x_hi)
        if GROUP == 0:
            acc_i = tl.dot(lo, xl, acc=acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(hi, xh, acc=acc_i, out_dtype=tl.int32)
        else:
            acc_i = tl.dot(lo, xl, acc=acc_i, out_dtype=tl.int32)
            acc_i = tl.dot(hi, xh, acc=acc_i, out_dtype=tl.int32)
            if (k0 + BLOCK_K) % GROUP == 0:  # group complete: scale and restart
                sg = tl.load(s_ptr + rows_n * stride_sn + k0 // GROUP).to(tl.float32)
                acc += acc_i.to(tl.float32) * sg[:, None]
                acc_i = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        p_ptrs += BLOCK_K // 2
        x_lo += BLOCK_K
        x_hi += BLOCK_K
    # -- epilogue ------------------------------------------------------------------------
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GROUP == 0:
        sw = tl.load(s_ptr + rows_n * stride_sn).to(tl.float32)
        acc = acc_i.to(tl.float32) * sw[:, None]
    sa = tl.load(sa_ptr + rows_m)
    acc = acc * sa[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[:, None]
    # -- store C (M, N): the tile is (BN, BM), so element [n, m] goes to c[m, n] -------------
    c_ptrs = c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


def _configs() -> list:
    out = []
    for bn, bm, w, s in [(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 4, 4),
                         (64, 128, 4, 4), (128, 64, 4, 4)]:
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "GROUP_N": 8}, num_warps=w, num_stages=s))
    return out


@functools.cache
def _tuned():
    return triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "GROUP"])(_bucketed)


@triton.jit
def _bucketed(p_ptr, s_ptr, x_ptr, sa_ptr, bias_ptr, c_ptr, M, N, K, M_BUCKET,
              stride_pn, stride_sn, stride_xm, stride_cm,
              GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr):
    _w4a8_swapped_kernel(p_ptr, s_ptr, x_ptr, sa_ptr, bias_ptr, c_ptr, M, N, K,
                         stride_pn, stride_sn, stride_xm, stride_cm, GROUP, HAS_BIAS,
                         BLOCK_N, BLOCK_M, GROUP_N)


def swapped_unsupported(k: int, group_size: int) -> str | None:
    if k % 128:
        return f"K={k} is not a multiple of 128"
    if group_size < k and group_size % 128:
        return f"group_size={group_size} is not a multiple of 128"
    return None


def w4a8_gemm_swapped(qx_perm: torch.Tensor, sa: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None, group_size: int, out_dtype: torch.dtype,
                      config: dict | None = None) -> torch.Tensor:
    """qx_perm: act_quant(x, permute=True)[0]; packed (N, K/2) uint8; scale (N, G)."""
    m, k = qx_perm.shape
    n = packed.shape[0]
    reason = swapped_unsupported(k, group_size)
    if reason:
        raise ValueError(f"swapped W4A8 GEMM: {reason}")
    if max(m, n) * k >= 2**31:
        raise ValueError("swapped W4A8 GEMM offsets are int32: M*K and N*K must be < 2**31")
    group = 0 if group_size >= k else group_size
    c = torch.empty((m, n), dtype=out_dtype, device=qx_perm.device)
    args = (packed.view(torch.int8), scale, qx_perm, sa, bias if bias is not None else scale, c, m, n, k)
    strides = (packed.stride(0), scale.stride(0), qx_perm.stride(0), c.stride(0))
    if config is not None or interpreter_enabled():
        cfg = dict(config or {"BLOCK_N": 32, "BLOCK_M": 32, "GROUP_N": 4})
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _w4a8_swapped_kernel[grid](*args, *strides, GROUP=group, HAS_BIAS=bias is not None, **cfg)
        return c
    tuned_grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _tuned()[tuned_grid](*args, min(triton.next_power_of_2(m), 8192), *strides, GROUP=group,
                   HAS_BIAS=bias is not None)
    return c
