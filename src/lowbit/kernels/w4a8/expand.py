"""The weight workspaces of the prefill paths: int4 -> int8 expansion (W4A8) and int4 ->
bf16/fp16 dequantization (weight-only), each one layer's size and freed after the call (the
caching allocator reuses it layer after layer).

    Wp (N, K/2) bytes  [ w1|w0 ][ w3|w2 ] ...   ->   W8 (N, K) int8  w0 w1 w2 w3 ...

The expansion costs one read of N*K/2 and one write of N*K bytes (~45 us for 22016x4096 on
H100), paid once per call instead of once per M tile: unpacking inside the GEMM's K loop puts
shifts on the tensor-core operand path and measured 0.7-0.9x bf16. `quant_and_unpack` runs it in
the same launch as the per-token activation quantization (two independent memory-bound jobs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowbit.kernels.w4a8.act_quant import act_quant_launch, act_quant_row, empty_quantized


# -- int4 -> int8 expansion (W4A8) ------------------------------------------------------
@triton.jit
def _unpack_block(blk, p_ptr, out_ptr, total_bytes, BLOCK: tl.constexpr):
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total_bytes
    p = tl.load(p_ptr + offs, mask=mask, other=0)
    lo = (p << 4) >> 4
    hi = p >> 4
    both = tl.reshape(tl.join(lo, hi), (2 * BLOCK,))  # byte i -> elements 2i, 2i+1
    out_offs = blk.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, both, mask=out_offs < 2 * total_bytes)


@triton.jit
def _unpack_int4_kernel(p_ptr, out_ptr, total_bytes, BLOCK: tl.constexpr):
    _unpack_block(tl.program_id(0), p_ptr, out_ptr, total_bytes, BLOCK)


@triton.jit
def _quant_unpack_kernel(x_ptr, q_ptr, s_ptr, p_ptr, w_ptr, M, K, stride_xm, total_bytes,
                         BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr):
    # Programs 0..M-1 quantize activation rows, the rest expand the weight: one launch, two
    # independent memory-bound jobs, no tail between them.
    pid = tl.program_id(0)
    if pid < M:
        act_quant_row(pid, x_ptr, q_ptr, s_ptr, K, stride_xm, K, BLOCK_K, ONE_PASS, False)
    else:
        _unpack_block(pid - M, p_ptr, w_ptr, total_bytes, BLOCK)


def quant_and_unpack(x: torch.Tensor, packed: torch.Tensor, ublock: int = 4096,
                     num_warps: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act_quant(x) and unpack_int4_triton(packed) in one launch: (q (M, K), s (M, 1), w8 (N, K)).

    ublock: packed bytes per expanding program (a power of two); num_warps: per program."""
    if x.dim() != 2 or packed.dim() != 2 or packed.shape[1] * 2 != x.shape[1]:
        raise ValueError(f"quant_and_unpack: x (M, K) and packed (N, K/2), got {tuple(x.shape)} and "
                         f"{tuple(packed.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    packed = packed.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    q, s = empty_quantized(m, k, x.device)
    w8 = torch.empty((n, k), dtype=torch.int8, device=x.device)
    block_k, one_pass, _ = act_quant_launch(k, m)
    total = n * (k // 2)
    grid = (m + triton.cdiv(total, ublock),)
    if grid[0]:
        _quant_unpack_kernel[grid](x, q, s, packed.view(torch.int8), w8, m, k, x.stride(0), total,
                                   BLOCK_K=block_k, ONE_PASS=one_pass, BLOCK=ublock, num_warps=num_warps)
    return q, s, w8


def unpack_int4_triton(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) int8 (contiguous)."""
    n, kh = packed.shape
    packed = packed.contiguous()
    if out is None:
        out = torch.empty((n, 2 * kh), dtype=torch.int8, device=packed.device)
    total = n * kh
    block = 4096
    _unpack_int4_kernel[(triton.cdiv(total, block),)](packed.view(torch.int8), out, total, BLOCK=block,
                                                      num_warps=8)
    return out


# -- weight-only prefill: dequantize into a one-layer workspace, then a dense GEMM -----------
@triton.jit
def _dequant_int4_kernel(p_ptr, s_ptr, z_ptr, out_ptr, total_bytes, KH, GROUP_BYTES, G,
                         HAS_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total_bytes
    p = tl.load(p_ptr + offs, mask=mask, other=0)
    row = offs // KH
    sidx = row * G + (offs % KH) // GROUP_BYTES
    s = tl.load(s_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
    lo = ((p << 4) >> 4).to(tl.float32) * s
    hi = (p >> 4).to(tl.float32) * s
    if HAS_ZERO:
        z = tl.load(z_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
        lo += z
        hi += z
    both = tl.reshape(tl.join(lo, hi), (2 * BLOCK,)).to(out_ptr.dtype.element_ty)
    out_offs = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, both, mask=out_offs < 2 * total_bytes)


def dequant_int4_triton(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, K/2) packed + (N, G) scales [+ float zeros] -> (N, K) `dtype` (w = q * s + z)."""
    n, kh = packed.shape
    scale = scale.contiguous()
    out = torch.empty((n, 2 * kh), dtype=dtype, device=packed.device)
    total = n * kh
    block = 2048
    _dequant_int4_kernel[(triton.cdiv(total, block),)](
        packed.contiguous().view(torch.int8), scale, zero.contiguous() if zero is not None else scale,
        out, total, kh, group_size // 2, scale.shape[1], HAS_ZERO=zero is not None, BLOCK=block,
        num_warps=8,
    )
    return out
