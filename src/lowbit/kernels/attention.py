"""Decode attention over a static KV cache, reading only the filled positions.

One new token per sequence attends to cache positions 0..pos (pos read from a device tensor,
so the call is CUDA-graph safe while pos advances). The masked SDPA call it replaces reads the
whole cache every step, filled or not: at batch 16 with a 160-token cache that is 42 MB per
layer per step, 23 us on an H100 (results/profile_decode_w4a8_b16_cache160_h100.txt).

    q (B, H, 1, D), k/v cache (B, KV, S, D), H = KV * G (grouped-query heads share a kv head)
    out[b, kv*G + g] = softmax(q . k[0..pos] / sqrt(D)) @ v[0..pos]

Flash-decoding: programs (b, kv head, split) each take the G query heads of one kv head (one
read of K and V serves all of them, padded to 16 rows for the tensor-core dot) over a slice of
the valid positions, with an online softmax in fp32 (probabilities rounded to the value dtype
for the P @ V dot, as flash attention does). With more than one split the partial results
(max, sum, unnormalized output) are merged by a second kernel. Splits beyond pos do nothing.

Pure-torch reference: decode_attention_ref (F.scaled_dot_product_attention with the mask).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lowbit.kernels.w4a8.gemv_dp4a import num_sms

BLOCK_S = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                        KV, CHUNK, sm_scale_log2,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                        stride_vb, stride_vh, stride_vs, stride_ob, stride_oh,
                        NSPLIT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // KV
    kvh = bh % KV
    length = tl.load(pos_ptr).to(tl.int32) + 1
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = (kvh * G + offs_g)[:, None]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads * stride_qh + offs_d[None, :], mask=g_ok[:, None],
                other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s0 in range(start, end, BLOCK):
        offs_s = s0 + tl.arange(0, BLOCK)
        s_ok = offs_s < end
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * sm_scale_log2
        qk = tl.where(s_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if NSPLIT == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        row = (bh * NSPLIT + split) * G_PAD + offs_g
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)
        tl.store(acc_ptr + row.to(tl.int64)[:, None] * D + offs_d[None, :], acc)


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, KV, stride_ob, stride_oh,
                    NSPLIT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    g = tl.program_id(1)
    b = bh // KV
    kvh = bh % KV
    offs_sp = tl.arange(0, NSPLIT)
    offs_d = tl.arange(0, D)
    row = (bh * NSPLIT + offs_sp) * G_PAD + g
    m = tl.load(m_ptr + row)  # -inf for splits past pos (split 0 always holds position 0)
    m_max = tl.max(m, axis=0)
    w = tl.math.exp2(m - m_max)
    denom = tl.sum(tl.load(l_ptr + row) * w, axis=0)
    acc = tl.load(acc_ptr + row.to(tl.int64)[:, None] * D + offs_d[None, :])
    o = tl.sum(acc * w[:, None], axis=0) / denom
    o_row = out_ptr + b.to(tl.int64) * stride_ob + (kvh * G + g) * stride_oh
    tl.store(o_row + offs_d, o.to(out_ptr.dtype.element_ty))


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> str | None:
    """Why decode_attention cannot take these inputs (None: it can)."""
    if q.dim() != 4 or q.shape[2] != 1:
        return f"q must be (B, H, 1, D) (one new token), got {tuple(q.shape)}"
    b, h, _, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        return f"k/v cache must be (B={b}, KV, S, D={d}), got {tuple(k.shape)} and {tuple(v.shape)}"
    if h % k.shape[1]:
        return f"{h} query heads are not a multiple of {k.shape[1]} kv heads"
    if d < 16 or d > 256 or d & (d - 1):
        return f"head_dim must be a power of two in [16, 256], got {d}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one fp16/bf16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        return f"pos must be one int32/int64 position, got shape {tuple(pos.shape)} {pos.dtype}"
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return "q, k and v need a unit stride along head_dim"
    return None


# NOTE: H100, batch 1 x 32 kv heads, 32 calls back to back on distinct caches (a decode step's
# layers; results/decode_attention_h100.json "back_to_back"): a 160-position cache took 5.2 us
# per call unsplit vs 6.8 us in 2 splits (the merge kernel and its launch cost more than the
# parallelism gains); 1024 positions: 9.8 us in 4 splits, 12.3 unsplit; 4096: 13.2 us in 8
# splits, 17.5 unsplit. So each split gets at least MIN_SPLIT_LEN cache positions.
MIN_SPLIT_LEN = 256


def num_splits(programs: int, length: int, sms: int = 132) -> int:
    """Splits of the cache so that (B * KV) x splits programs fill the GPU twice over, each split
    at least MIN_SPLIT_LEN positions: a power of two <= 64."""
    want = max(1, -(-2 * sms // programs))
    cap = max(1, min(64, length // MIN_SPLIT_LEN))
    n = 1
    while n * 2 <= min(want, cap):
        n *= 2
    return n


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     splits: Optional[int] = None) -> torch.Tensor:  # noqa: UP045 (op schema)
    """Attention of one new token per sequence over cache positions 0..pos. -> (B, H, 1, D).

    splits: cache splits (a power of two <= 64; None: num_splits' rule)."""
    reason = unsupported(q, k, v, pos)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    if splits is not None and (splits < 1 or splits > 64 or splits & (splits - 1)):
        raise ValueError(f"decode_attention: splits must be a power of two in [1, 64], got {splits}")
    b, h, _, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    g_pad = max(16, triton.next_power_of_2(g))
    out = torch.empty((b, h, 1, d), dtype=q.dtype, device=q.device)
    sms = num_sms(q.device.index or 0) if q.is_cuda else 132
    nsplit = num_splits(b * kv, s, sms) if splits is None else splits
    chunk = triton.cdiv(triton.cdiv(s, nsplit), BLOCK_S) * BLOCK_S
    if nsplit > 1:
        m = torch.empty((b * kv * nsplit * g_pad,), dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        acc = torch.empty((b * kv * nsplit * g_pad, d), dtype=torch.float32, device=q.device)
    else:
        m = lsum = acc = out  # unused
    sm_scale_log2 = d ** -0.5 * _LOG2E
    _decode_attn_kernel[(b * kv, nsplit)](
        q, k, v, pos, out, m, lsum, acc, kv, chunk, sm_scale_log2,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        NSPLIT=nsplit, G=g, G_PAD=g_pad, D=d, BLOCK=BLOCK_S, num_warps=4)
    if nsplit > 1:
        _combine_kernel[(b * kv, g)](m, lsum, acc, out, kv, out.stride(0), out.stride(1),
                                     NSPLIT=nsplit, G=g, G_PAD=g_pad, D=d, num_warps=4)
    return out


decode_attention_op = torch.library.custom_op("lowbit::decode_attention", mutates_args=())(decode_attention)


@decode_attention_op.register_fake
def _(q, k, v, pos, splits=None):
    return q.new_empty((q.shape[0], q.shape[1], 1, q.shape[3]))


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
                         ) -> torch.Tensor:
    """The masked SDPA the kernel replaces (float32 math), GQA by repeating kv heads."""
    g = q.shape[1] // k.shape[1]
    mask = (torch.arange(k.shape[2], device=q.device) <= pos.reshape(1)).view(1, -1)  # (1, S)
    kr = k.float().repeat_interleave(g, dim=1)
    vr = v.float().repeat_interleave(g, dim=1)
    y = torch.nn.functional.scaled_dot_product_attention(q.float(), kr, vr, attn_mask=mask)
    return y.to(q.dtype)
