"""RoPE on q and k straight from the fused [q; k; v] projection output, and (decode) RoPE + the
KV-cache write in one kernel.

  rope       out = bf(bf(x * cos) + bf(rot(x) * sin))       (rotate-half layout, q and k together)

The roundings of the eager chain (lowbit.llm.model.apply_rope). Every launch passes
enable_fp_fusion=False: Triton otherwise turns `(a * b).to(bf16)` followed by an add into one
bf16 FMA, a different result (seen on the H100). The W4A8 streaming GEMV's RoPE epilogue
(w4a8/gemv_stream.py) repeats this arithmetic with `mul.rn` products instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# -- RoPE on q and k, straight from the fused qkv projection -------------------------------
@triton.jit
def _rope_rows(qkv_row, cos_ptr, sin_ptr, t, NQ, NK, dt: tl.constexpr, HALF: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """One token's qkv row (position index t in cos/sin): its q and k heads as (BLOCK_H, HALF)
    halves, rotated (rotate-half layout) and rounded like the eager chain.
    -> (heads, d, valid, o1, o2)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    ok = heads < NQ + NK
    src = qkv_row + heads * (2 * HALF) + d
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * (2 * HALF) + d).to(tl.float32)
    c2 = tl.load(cos_ptr + t * (2 * HALF) + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + t * (2 * HALF) + d).to(tl.float32)
    s2 = tl.load(sin_ptr + t * (2 * HALF) + HALF + d).to(tl.float32)
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    return heads, d, ok, o1, o2


@triton.jit
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, T, stride_b, stride_t, NQ, NK,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    # one program per token: all q heads and k heads (rows of HALF pairs)
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    heads, d, ok, o1, o2 = _rope_rows(qkv_ptr + (row // T) * stride_b + t * stride_t, cos_ptr, sin_ptr, t,
                                      NQ, NK, q_ptr.dtype.element_ty, HALF, BLOCK_H)
    is_q = heads < NQ
    qdst = q_ptr + row * (NQ * 2 * HALF) + heads * (2 * HALF) + d
    tl.store(qdst, o1, mask=is_q)
    tl.store(qdst + HALF, o2, mask=is_q)
    kdst = k_ptr + row * (NK * 2 * HALF) + (heads - NQ) * (2 * HALF) + d
    is_k = ok & (heads >= NQ)
    tl.store(kdst, o1, mask=is_k)
    tl.store(kdst + HALF, o2, mask=is_k)


def rope_qk(qkv: torch.Tensor, n_q: int, n_k: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, T, (n_q + 2 n_k) * D) -> rotated q (B, T, n_q, D), k (B, T, n_k, D), contiguous.

    cos/sin (T, D) in qkv's dtype, rotate-half layout (lowbit.llm.model.rope_tables).
    """
    b, t, width = qkv.shape
    if width != (n_q + 2 * n_k) * head_dim or head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"rope_qk: qkv width {width} != ({n_q} + 2*{n_k}) * {head_dim}, or head_dim not "
                         "a power of two")
    if cos.shape != (t, head_dim) or sin.shape != (t, head_dim) or cos.dtype != qkv.dtype:
        raise ValueError(f"rope_qk: cos/sin must be ({t}, {head_dim}) {qkv.dtype}, got {tuple(cos.shape)} "
                         f"{cos.dtype}")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty((b, t, n_q, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((b, t, n_k, head_dim), dtype=qkv.dtype, device=qkv.device)
    if b * t:
        _rope_kernel[(b * t,)](qkv, cos.contiguous(), sin.contiguous(), q, k, t, qkv.stride(0), qkv.stride(1),
                               n_q, n_k,
                               HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(n_q + n_k),
                               num_warps=4, enable_fp_fusion=False)
    return q, k


# -- decode: RoPE on q and k + the KV-cache write, one kernel ---------------------------------
@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, T, S, stride_b, stride_t,
                       NQ, NK, stride_cb, stride_ch, stride_cs, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_KV: tl.constexpr):
    # one program per token: rotate its q and k heads (as _rope_kernel), store q, write the rotated
    # k and the v heads into the caches at the token's position (none past the cache: p < S)
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    p = tl.load(pos_ptr + t).to(tl.int64)
    qkv_row = qkv_ptr + b * stride_b + t * stride_t
    heads, d, ok, o1, o2 = _rope_rows(qkv_row, cos_ptr, sin_ptr, t, NQ, NK, q_ptr.dtype.element_ty, HALF,
                                      BLOCK_H)
    is_q = heads < NQ
    qdst = q_ptr + row * (NQ * 2 * HALF) + heads * (2 * HALF) + d
    tl.store(qdst, o1, mask=is_q)
    tl.store(qdst + HALF, o2, mask=is_q)
    kdst = kc_ptr + b * stride_cb + (heads - NQ).to(tl.int64) * stride_ch + p * stride_cs + d
    pk = p + tl.zeros_like(heads)
    is_k = ok & (heads >= NQ) & (pk >= 0) & (pk < S)
    tl.store(kdst, o1, mask=is_k)
    tl.store(kdst + HALF, o2, mask=is_k)
    hv = tl.arange(0, BLOCK_KV)[:, None]
    dv = tl.arange(0, 2 * HALF)[None, :]
    pv = p + tl.zeros_like(hv)
    v_ok = (hv < NK) & (pv >= 0) & (pv < S)
    v = tl.load(qkv_row + (NQ + NK + hv) * (2 * HALF) + dv, mask=v_ok, other=0.0)
    tl.store(vc_ptr + b * stride_cb + hv.to(tl.int64) * stride_ch + p * stride_cs + dv, v, mask=v_ok)


def check_rope_cache(what: str, b: int, t: int, width: int, dtype: torch.dtype, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n_q: int,
                     n_k: int) -> int:
    """Checks the operands of a RoPE + KV-cache write for B x T tokens of a [q; k; v] row of `width`
    values in `dtype`; returns head_dim."""
    d = kc.shape[-1] if kc.dim() == 4 else 0
    if kc.dim() != 4 or kc.shape != vc.shape or kc.stride() != vc.stride() or kc.shape[:2] != (b, n_k):
        raise ValueError(f"{what}: caches must be two (B={b}, {n_k}, S, D) tensors with equal "
                         f"strides, got {tuple(kc.shape)} and {tuple(vc.shape)}")
    if width != (n_q + 2 * n_k) * d or d < 2 or d & (d - 1) or kc.stride(-1) != 1:
        raise ValueError(f"{what}: qkv width {width} != ({n_q} + 2*{n_k}) * {d}, or head_dim "
                         "not a power of two with unit stride")
    if (cos.shape != (t, d) or sin.shape != (t, d) or cos.dtype != dtype or sin.dtype != dtype
            or kc.dtype != dtype or vc.dtype != dtype):
        raise ValueError(f"{what}: cos/sin must be ({t}, {d}) and they and the caches {dtype}, got "
                         f"{tuple(cos.shape)} {cos.dtype} / {sin.dtype}, caches {kc.dtype} / {vc.dtype}")
    if pos.shape != (t,) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: pos must be ({t},) int32/int64, got {tuple(pos.shape)} "
                         f"{pos.dtype}")
    if len({cos.device, sin.device, pos.device, kc.device, vc.device}) != 1:
        raise ValueError(f"{what}: cos, sin, pos and the caches must be on one device, got "
                         f"{[str(v.device) for v in (cos, sin, pos, kc, vc)]}")
    return d


def rope_cache_update(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                      kc: torch.Tensor, vc: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """Decode tokens: qkv (B, T, (n_q + 2 n_k) * D), cos/sin (T, D) at the tokens' positions pos (T,).

    Writes the rotated k and the v of every token into the static caches kc / vc (B, n_k, S, D) at
    its position, in place, and returns the rotated q (B, T, n_q, D). Same roundings as rope_qk;
    replaces rope_qk + two index_copy_ launches (one kernel per decode layer instead of three).
    pos lives on the device (CUDA-graph replays advance it), so it is not checked here: a position
    outside [0, S) writes nothing (Generator.check keeps prompt + new tokens within the cache).
    """
    b, t, width = qkv.shape
    d = check_rope_cache("rope_cache_update", b, t, width, qkv.dtype, cos, sin, pos, kc, vc, n_q, n_k)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty((b, t, n_q, d), dtype=qkv.dtype, device=qkv.device)
    if b * t:
        _rope_cache_kernel[(b * t,)](
            qkv, cos.contiguous(), sin.contiguous(), pos.contiguous(), q, kc, vc, t, kc.shape[2],
            qkv.stride(0), qkv.stride(1), n_q, n_k, kc.stride(0), kc.stride(1), kc.stride(2), HALF=d // 2,
            BLOCK_H=triton.next_power_of_2(n_q + n_k), BLOCK_KV=triton.next_power_of_2(n_k), num_warps=4,
            enable_fp_fusion=False)
    return q


@torch.library.custom_op("lowbit::rope_cache_update", mutates_args=("kc", "vc"))
def rope_cache_update_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                         kc: torch.Tensor, vc: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    return rope_cache_update(qkv, cos, sin, pos, kc, vc, n_q, n_k)


@rope_cache_update_op.register_fake
def _(qkv, cos, sin, pos, kc, vc, n_q, n_k):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], n_q, kc.shape[-1]))


__all__ = ["rope_qk", "check_rope_cache", "rope_cache_update", "rope_cache_update_op"]
