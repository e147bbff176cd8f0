"""L2 prefetch of a weight's leading bytes (Hopper bulk prefetch, `cp.async.bulk.prefetch.L2`).

Decode at batch 1 alternates weight-streaming GEMVs with short latency-bound kernels (norms,
RoPE, attention, SwiGLU) while HBM idles. A prefetch issued at the start of such a window pulls
the first bytes of the next GEMV's weight into L2, so that GEMV reads them from L2. The prefetch
is a hint: it has no result, changes no memory, and the copy engine carries it on after the
issuing program has exited. On anything but a CUDA GPU of compute capability >= 9.0 it does
nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

PREFETCH_CHUNK = 32768  # bytes per bulk prefetch instruction


@triton.jit
def _bulk_prefetch(addr, nbytes, EVICT_LAST: tl.constexpr):
    """One `cp.async.bulk.prefetch.L2` per element: addr int64 byte addresses (16-aligned),
    nbytes int32 (a multiple of 16). Returns a dummy int32 (the asm must produce a value)."""
    if EVICT_LAST:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0;"
            " cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; } mov.u32 $0, 0;",
            "=r,l,r", [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
            "=r,l,r", [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr):
    # base: int64 byte address; chunks past the end re-prefetch the last full chunk (harmless).
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    off = tl.minimum(idx.to(tl.int64) * CHUNK, nbytes - CHUNK)
    _bulk_prefetch(base + off, tl.full([BLOCK], CHUNK, tl.int32), EVICT_LAST)


@triton.jit
def _line_prefetch_kernel(base, nbytes, BLOCK: tl.constexpr):
    # one `prefetch.global.L2::evict_last` per 128-byte line; BLOCK lines per program
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    off = tl.minimum(idx.to(tl.int64) * 128, nbytes - 128)
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                              [base + off], dtype=tl.int32, is_pure=False, pack=1)


@functools.cache
def supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def l2_prefetch(t: torch.Tensor, nbytes: int, policy: str = "normal", chunk: int = PREFETCH_CHUNK,
                block: int = 128, mode: str = "bulk") -> None:
    """Prefetch the first nbytes (rounded down to whole chunks) of t's storage into L2: `block`
    bulk prefetches of `chunk` bytes per program (mode "bulk"), or one per 128-byte line ("line")."""
    if policy not in ("normal", "evict_last"):
        raise ValueError(f"policy must be 'normal' or 'evict_last', got {policy!r}")
    if not t.is_cuda or not supported(t.device.index or 0):
        return
    if mode == "line":
        chunk = 128
    nbytes = min(nbytes, t.numel() * t.element_size()) // chunk * chunk
    if nbytes <= 0 or t.data_ptr() % 16:
        return
    chunks = nbytes // chunk
    grid = (triton.cdiv(chunks, block),)
    if mode == "line":
        _line_prefetch_kernel[grid](t.data_ptr(), nbytes, BLOCK=block, num_warps=4)
    else:
        _prefetch_kernel[grid](t.data_ptr(), nbytes, CHUNK=chunk, BLOCK=block,
                               EVICT_LAST=policy == "evict_last", num_warps=max(1, min(4, block // 32)))
