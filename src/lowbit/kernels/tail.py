"""Last-program tails: work on a kernel's whole output done by the program that finishes last, so
that the next small kernel (and its launch) is not needed.

A decode step at batch 1 is a chain of short kernels; one that only needs a GEMV's full output
row (the residual add + RMSNorm after a projection) costs a launch and a dependent round trip to
memory, about 3 us in a CUDA-graph replay, more than the work itself. With a tail the GEMV's
programs each count themselves in on an int32 counter when their outputs are stored (a barrier,
then one acq_rel atomic at GPU scope); the program that sees the count reach the grid size knows
every output is visible and does the row work alone, then puts the counter back to zero for the
next launch. Nothing waits on anything: no program spins, so it holds under TRITON_INTERPRET
(programs run one after another) and on any grid size.

Counters (tail_counter) are one int32 per device and stream, allocated once (before a CUDA-graph
capture: the warm-up step allocates them) and always left at zero by the kernel that used them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def tail_counter(device: torch.device) -> torch.Tensor:
    """The zeroed int32 arrival counter of the current stream on `device`."""
    idx = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda"
                                                          else -1)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (idx, stream)
    c = _COUNTERS.get(key)
    if c is None:
        c = _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


class NormTail(NamedTuple):
    """The add + RMSNorm tail of a GEMV whose output is a residual update: h = residual + out
    (rounded to the residual's dtype) and y = rms_norm(h) * weight (rounded as
    fused.add_rms_norm rounds), both (M, N) and written into h / y."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    h: torch.Tensor
    y: torch.Tensor
    counter: torch.Tensor


@triton.jit
def mul_rn(a, b, USE_ASM: tl.constexpr):
    """a * b in float32, rounded on its own (no FMA contraction)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def arrived_last(counter_ptr):
    """True in the program that stores its outputs last (all others' stores are visible to it)."""
    tl.debug_barrier()
    n = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return n == tl.num_programs(0) - 1


@triton.jit
def add_rms_norm_tail(d_ptr, stride_d, x_ptr, stride_x, w_ptr, h_ptr, y_ptr, stride_hy, counter_ptr, M, D,
                      eps, BLOCK_D: tl.constexpr, USE_ASM: tl.constexpr):
    """The NormTail of a kernel whose programs have stored d (M, D): fused._rms_norm_kernel's
    arithmetic with HAS_RES (mul.rn where that kernel relies on enable_fp_fusion=False)."""
    if arrived_last(counter_ptr):
        f32: tl.constexpr = tl.float32
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        for m in range(M):
            dl = tl.load(d_ptr + m * stride_d + offs, mask=mask, other=0.0, cache_modifier=".cg")
            x = tl.load(x_ptr + m * stride_x + offs, mask=mask, other=0.0)
            x = (x.to(f32) + dl.to(f32)).to(x_ptr.dtype.element_ty)
            tl.store(h_ptr + m * stride_hy + offs, x, mask=mask)
            xf = x.to(f32)
            r = 1.0 / tl.sqrt_rn(tl.sum(mul_rn(xf, xf, USE_ASM), axis=0) / D + eps)
            hn = (xf * r).to(w_ptr.dtype.element_ty).to(f32)
            tl.store(y_ptr + m * stride_hy + offs, (w.to(f32) * hn).to(w_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter_ptr, 0)


def norm_tail(residual: torch.Tensor, weight: torch.Tensor, eps: float) -> NormTail:
    """Checks a NormTail's operands (residual (M, N) fp16/bf16 contiguous rows, weight (N,) of the
    same dtype) and allocates its outputs."""
    bad_rows = residual.dim() != 2 or residual.stride(-1) != 1
    if bad_rows or residual.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"norm tail: the residual must be (M, N) fp16/bf16 rows with unit stride, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if weight.shape != (residual.shape[1],) or weight.dtype != residual.dtype:
        raise ValueError(f"norm tail: the norm weight must be ({residual.shape[1]},) {residual.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    return NormTail(residual, weight.contiguous(), float(eps), torch.empty_like(residual),
                    torch.empty_like(residual), tail_counter(residual.device))


def tail_args(norm: NormTail | None, like: torch.Tensor) -> tuple:
    """The kernel arguments of a NormTail (x, stride_x, weight, h, y, stride_hy, counter, eps), or
    placeholders."""
    if norm is None:
        return (like, 0, like, like, like, 0, like, 0.0)
    return (norm.residual, norm.residual.stride(0), norm.weight, norm.h, norm.y, norm.h.stride(0),
            norm.counter, norm.eps)


def block_d(n: int) -> int:
    return max(triton.next_power_of_2(n), 128)
