"""RoPE and the KV-cache write inside the streaming W4A8 GEMV (gemv_dp4a.w4a8_gemv_rope_cache).

The fused kernel must give the values of the chain it replaces -- the stream GEMV's [q; k; v]
output, then rope.rope_cache_update -- bit for bit, in q and in both caches, and agree with pure
torch (reference W4A8 linear, eager RoPE, index_copy_ into the caches). On CPU under
TRITON_INTERPRET; on a GPU the same tests plus Llama-sized shapes.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels import rope
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a, w4a8_gemv_rope_cache
from lowbit.kernels.w4a8.reference import act_quant_ref, int8_gemm_ref
from lowbit.llm.model import apply_rope

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


def _operands(b, t, nq, nk, d, k, group, dtype, s=7, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = (nq + 2 * nk) * d
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen).to(DEV)
    scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).to(DEV, dtype)
    x = torch.randn(b * t, k, generator=gen).to(DEV, dtype)
    bi = torch.randn(n, generator=gen).to(DEV, dtype) if bias else None
    ang = torch.randn(t, d // 2, generator=gen) * 3
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEV, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEV, dtype)
    kc = torch.randn(b, nk, s, d, generator=gen).to(DEV, dtype)
    vc = torch.randn(b, nk, s, d, generator=gen).to(DEV, dtype)
    return q, x, scale, bi, cos, sin, kc, vc


@pytest.mark.parametrize("b,t,nq,nk,d,k,group,dtype,bias,pos", [
    (1, 1, 4, 2, 8, 64, None, torch.bfloat16, False, [2]),
    (2, 1, 3, 1, 16, 96, 32, torch.float16, True, [6]),  # K not a power of two, g32, bias, last slot
    (1, 3, 2, 2, 4, 64, None, torch.bfloat16, False, [1, 5, 0]),  # 3 tokens, 4-row block
    (4, 1, 6, 2, 8, 128, None, torch.float16, False, [3]),  # GQA, 4 sequences
    (2, 2, 2, 1, 32, 64, 32, torch.bfloat16, True, [0, 4]),
    (1, 1, 3, 1, 2, 64, None, torch.float16, False, [1]),  # N/2 = 5 pairs: a partial last tile
    (2, 1, 5, 2, 2, 64, None, torch.bfloat16, False, [3]),  # 9 pairs, GQA
] + ([(1, 1, 32, 32, 128, 4096, None, torch.bfloat16, False, [77]),
      (2, 1, 32, 8, 128, 4096, 128, torch.bfloat16, False, [100]),
      (4, 1, 32, 32, 128, 4096, None, torch.float16, True, [5])] if ON_GPU else []))
def test_rope_cache_gemv_equals_the_kernel_chain(b, t, nq, nk, d, k, group, dtype, bias, pos):
    s = max(pos) + 2
    wq, x, scale, bi, cos, sin, kc, vc = _operands(b, t, nq, nk, d, k, group or k, dtype, s, bias)
    packed = pack_int4(wq)
    p = torch.tensor(pos, device=DEV, dtype=torch.int32 if b % 2 == 0 else torch.int64)
    kc2, vc2 = kc.clone(), vc.clone()
    kc0, vc0 = kc.clone(), vc.clone()
    got = w4a8_gemv_rope_cache(x, packed, scale, bi, group or k, cos, sin, p, kc, vc, nq, nk, t)
    qkv = w4a8_gemv_dp4a(x, packed, scale, bi, group or k, kernel="stream")
    want = rope.rope_cache_update(qkv.view(b, t, -1), cos, sin, p, kc2, vc2, nq, nk)
    assert got.shape == (b, t, nq, d) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    others = torch.ones(s, dtype=torch.bool, device=DEV)
    others[p] = False
    assert torch.equal(kc[:, :, others], kc0[:, :, others])
    assert torch.equal(vc[:, :, others], vc0[:, :, others])
    # against pure torch: reference W4A8 linear, eager RoPE and cache writes
    qa, sa = act_quant_ref(x.float())
    ref = int8_gemm_ref(qa, sa, wq, scale, bi, group or k, torch.float32).to(dtype).view(b, t, -1)
    rq, rk, rv = ref.split([nq * d, nk * d, nk * d], dim=-1)
    rq = apply_rope(rq.reshape(b, t, nq, d).transpose(1, 2), cos, sin)
    rk = apply_rope(rk.reshape(b, t, nk, d).transpose(1, 2), cos, sin)
    kr, vr = kc0.clone(), vc0.clone()
    kr.index_copy_(2, p.long(), rk)
    vr.index_copy_(2, p.long(), rv.reshape(b, t, nk, d).transpose(1, 2))
    tol = dict(rtol=2e-2, atol=2e-2 * max(ref.abs().max().item(), 1.0))
    torch.testing.assert_close(got.transpose(1, 2).float(), rq.float(), **tol)
    torch.testing.assert_close(kc.float(), kr.float(), **tol)
    torch.testing.assert_close(vc.float(), vr.float(), **tol)


def test_rope_cache_gemv_writes_nothing_outside_the_cache():
    wq, x, scale, _, cos, sin, kc, vc = _operands(2, 1, 2, 1, 8, 64, 64, torch.float16, s=4)
    packed = pack_int4(wq)
    kc0, vc0 = kc.clone(), vc.clone()
    for pos in (-1, 4, 9):
        p = torch.tensor([pos], device=DEV)
        q = w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin, p, kc, vc, 2, 1, 1)
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
        qkv = w4a8_gemv_dp4a(x, packed, scale, None, 64, kernel="stream")
        want = rope.rope_cache_update(qkv.view(2, 1, -1), cos, sin, torch.tensor([pos], device=DEV),
                                       kc0.clone(), vc0.clone(), 2, 1)
        assert torch.equal(q, want)


def test_rope_cache_gemv_writes_into_strided_cache_views():
    """Caches that are views of larger buffers (head stride != S * D): the writes land in the view
    and nothing outside it changes."""
    wq, x, scale, _, cos, sin, _, _ = _operands(2, 1, 2, 2, 8, 64, 64, torch.float16)
    packed = pack_int4(wq)
    big_k = torch.randn(2, 3, 9, 8, device=DEV).half()
    big_v = torch.randn(2, 3, 9, 8, device=DEV).half()
    k0, v0 = big_k.clone(), big_v.clone()
    kc, vc = big_k[:, 1:, 2:8], big_v[:, 1:, 2:8]
    p = torch.tensor([4], device=DEV)
    q = w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin, p, kc, vc, 2, 2, 1)
    qkv = w4a8_gemv_dp4a(x, packed, scale, None, 64, kernel="stream")
    kr, vr = k0[:, 1:, 2:8].clone(), v0[:, 1:, 2:8].clone()
    want = rope.rope_cache_update(qkv.view(2, 1, -1), cos, sin, p, kr, vr, 2, 2)
    assert torch.equal(q, want) and torch.equal(kc, kr) and torch.equal(vc, vr)
    k0[:, 1:, 2:8], v0[:, 1:, 2:8] = kr, vr
    assert torch.equal(big_k, k0) and torch.equal(big_v, v0)


def test_rope_cache_gemv_bad_input():
    wq, x, scale, _, cos, sin, kc, vc = _operands(2, 1, 2, 1, 8, 64, 64, torch.float16)
    packed = pack_int4(wq)
    p = torch.tensor([1], device=DEV)
    with pytest.raises(ValueError, match="fp16/bf16"):
        w4a8_gemv_rope_cache(x.float(), packed, scale, None, 64, cos, sin, p, kc, vc, 2, 1, 1)
    with pytest.raises(ValueError, match="B x t"):
        w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin, p, kc, vc, 2, 1, 3)
    with pytest.raises(ValueError, match="caches must be"):
        w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin, p, kc[:1], vc[:1], 2, 1, 1)
    with pytest.raises(ValueError, match="qkv width"):  # 3 query heads do not match the weight's rows
        w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin, p, kc, vc, 3, 1, 1)
    with pytest.raises(ValueError, match="cos/sin"):
        w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos.float(), sin.float(), p, kc, vc, 2, 1, 1)
    with pytest.raises(ValueError, match="cos/sin"):
        w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin.float(), p, kc, vc, 2, 1, 1)
    with pytest.raises(ValueError, match="cos/sin"):
        w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin, p, kc, vc.float(), 2, 1, 1)
    with pytest.raises(ValueError, match="pos must be"):
        w4a8_gemv_rope_cache(x, packed, scale, None, 64, cos, sin, p.float(), kc, vc, 2, 1, 1)
    with pytest.raises(ValueError, match="K/2"):
        w4a8_gemv_rope_cache(torch.randn(2, 128, device=DEV).half(), packed, scale, None, 64, cos, sin, p, kc,
                             vc, 2, 1, 1)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        w4a8_gemv_rope_cache(torch.randn(5, 64, device=DEV).half(), packed, scale, None, 64, cos, sin, p,
                             kc[:1].expand(5, -1, -1, -1), vc[:1].expand(5, -1, -1, -1), 2, 1, 1)


def test_rope_cache_gemv_noncontiguous_activations():
    wq, x, scale, _, cos, sin, kc, vc = _operands(2, 1, 2, 1, 8, 128, 128, torch.float16)
    packed = pack_int4(wq)
    base = torch.randn(2, 256, device=DEV).half()
    p = torch.tensor([2], device=DEV)
    kc2, vc2 = kc.clone(), vc.clone()
    q = w4a8_gemv_rope_cache(base[:, ::2], packed, scale, None, 128, cos, sin, p, kc, vc, 2, 1, 1)
    x2 = base[:, ::2].contiguous()
    q2 = w4a8_gemv_rope_cache(x2, packed, scale, None, 128, cos, sin, p, kc2, vc2, 2, 1, 1)
    assert torch.equal(q, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
