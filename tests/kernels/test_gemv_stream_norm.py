"""The residual add + RMSNorm in the streaming W4A8 GEMV's prologue (gemv_dp4a.NormIn).

The kernel takes the residual stream x and its pending update delta, writes h = x + delta, and
runs the linear on RMSNorm(h) * weight by quantizing h * weight per token and applying
r = 1 / rms(h) with the activation scale. Checked against the pure-torch reference
(reference.norm_gemv_ref), h against the fused add + RMSNorm kernel bit for bit, and the SwiGLU
and RoPE epilogues on top against the plain NORM GEMV followed by their kernels, bit for bit. On
CPU under TRITON_INTERPRET; on a GPU the same tests plus a Llama-sized row.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels import fused, rope
from lowbit.kernels.w4a8.gemv_dp4a import NormIn, w4a8_gemv_norm, w4a8_gemv_rope_cache, w4a8_gemv_swiglu
from lowbit.kernels.w4a8.reference import norm_gemv_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


def _operands(m, n, k, group, dtype, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen).to(DEV)
    scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).to(DEV, dtype)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    delta = torch.randn(m, k, generator=gen).to(DEV, dtype)
    nw = (torch.rand(k, generator=gen) + 0.5).to(DEV, dtype)
    bi = torch.randn(n, generator=gen).to(DEV, dtype) if bias else None
    return pack_int4(q), scale, x, delta, nw, bi


def _close(got, want):
    tol = 2 ** -7 if got.dtype == torch.bfloat16 else 2 ** -10  # an output rounding or two
    top = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * tol, atol=2 * tol * top)


@pytest.mark.parametrize("m,n,k,group,dtype,bias", [
    (1, 40, 64, None, torch.bfloat16, False),
    (3, 24, 128, 32, torch.float16, True),  # 3 tokens (a 4-row block), g32, bias
    (2, 20, 96, None, torch.bfloat16, False),  # K not a power of two
    (4, 33, 64, 32, torch.float16, False),
] + ([(1, 4096, 4096, None, torch.bfloat16, False), (2, 12288, 4096, 128, torch.bfloat16, False)]
     if ON_GPU else []))
def test_norm_gemv_matches_the_reference(m, n, k, group, dtype, bias):
    packed, scale, x, delta, nw, bi = _operands(m, n, k, group or k, dtype, bias)
    # h and delta as row-strided views; a sentinel row after h must stay untouched
    buf = torch.full((m + 1, k + 8), 7.0, device=DEV, dtype=dtype)
    h = buf[:m, :k]
    dbuf = torch.zeros(m, k + 16, device=DEV, dtype=dtype)
    dbuf[:, :k] = delta
    got = w4a8_gemv_norm(x, packed, scale, bi, group or k, NormIn(nw, 1e-5, dbuf[:, :k], h))
    h_chain, _ = fused.add_rms_norm(x, delta, nw, 1e-5)
    assert torch.equal(h, h_chain)  # the residual stream rounds as the add + norm kernel's
    assert (buf[m] == 7).all() and (buf[:, k:] == 7).all()
    if ON_GPU:  # the interpreter's float32 -> bf16 / fp16 conversion does not round to nearest even
        assert torch.equal(h, norm_gemv_ref(x, delta, nw, 1e-5, packed, scale, bi, group or k)[0])
    _, want = norm_gemv_ref(h, None, nw, 1e-5, packed, scale, bi, group or k)
    assert got.shape == (m, n) and got.dtype == dtype
    _close(got, want)
    # no delta: the linear of RMSNorm(x), nothing written
    got0 = w4a8_gemv_norm(x, packed, scale, bi, group or k, NormIn(nw, 1e-5))
    _close(got0, norm_gemv_ref(x, None, nw, 1e-5, packed, scale, bi, group or k)[1])


@pytest.mark.parametrize("m,f,k,group,dtype", [
    (1, 24, 64, None, torch.bfloat16), (3, 20, 96, 32, torch.float16),
] + ([(1, 11008, 4096, None, torch.bfloat16)] if ON_GPU else []))
def test_norm_swiglu_gemv_equals_the_norm_gemv_then_swiglu(m, f, k, group, dtype):
    packed, scale, x, delta, nw, _ = _operands(m, 2 * f, k, group or k, dtype, seed=1)
    h1, h2 = torch.empty_like(x), torch.empty_like(x)
    act, amax = w4a8_gemv_swiglu(x, packed, scale, None, group or k, norm=NormIn(nw, 1e-5, delta, h1))
    gu = w4a8_gemv_norm(x, packed, scale, None, group or k, NormIn(nw, 1e-5, delta, h2))
    # the kernel pairs gate row j with up row F + j: the plain GEMV's [gate; up] output, then SwiGLU
    assert torch.equal(act, fused.swiglu(gu)) and torch.equal(h1, h2)
    assert torch.equal(amax.amax(dim=1), act.float().abs().amax(dim=1))


@pytest.mark.parametrize("b,nq,nk,d,k,group,dtype,pos", [
    (1, 4, 2, 8, 64, None, torch.bfloat16, 2), (2, 3, 1, 16, 96, 32, torch.float16, 5),
] + ([(1, 32, 32, 128, 4096, None, torch.bfloat16, 77)] if ON_GPU else []))
def test_norm_rope_gemv_equals_the_norm_gemv_then_rope_cache(b, nq, nk, d, k, group, dtype, pos):
    n, s = (nq + 2 * nk) * d, pos + 2
    packed, scale, x, delta, nw, _ = _operands(b, n, k, group or k, dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    ang = torch.randn(1, d // 2, generator=gen) * 3
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEV, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEV, dtype)
    kc = torch.zeros(b, nk, s, d, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    kc2, vc2 = kc.clone(), vc.clone()
    p = torch.tensor([pos], device=DEV)
    h1, h2 = torch.empty_like(x), torch.empty_like(x)
    q = w4a8_gemv_rope_cache(x, packed, scale, None, group or k, cos, sin, p, kc, vc, nq, nk, 1,
                             norm=NormIn(nw, 1e-5, delta, h1))
    qkv = w4a8_gemv_norm(x, packed, scale, None, group or k, NormIn(nw, 1e-5, delta, h2))
    want = rope.rope_cache_update(qkv.view(b, 1, -1), cos, sin, p, kc2, vc2, nq, nk)
    assert torch.equal(q, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2) and kc.any()
    assert torch.equal(h1, h2)


def test_norm_operands_are_checked():
    packed, scale, x, delta, nw, _ = _operands(2, 16, 64, 64, torch.float16)
    h = torch.empty_like(x)
    bad = [
        (NormIn(nw[:32], 1e-5, delta, h), "norm weight"),
        (NormIn(nw.float(), 1e-5, delta, h), "norm weight"),
        (NormIn(nw, 1e-5, delta[:1], h), "delta"),
        (NormIn(nw, 1e-5, delta.float(), h), "delta"),
        (NormIn(nw, 1e-5, delta, None), "h_out"),
        (NormIn(nw, 1e-5, delta, h[:, :32]), "h_out"),
        (NormIn(nw, 1e-5, delta, torch.empty(64, 2, device=DEV, dtype=x.dtype).t()), "unit last stride"),
        (NormIn(nw, 1e-5, delta, x), "overlap"),
        (NormIn(nw, 1e-5, delta, delta), "overlap"),
        (NormIn(nw, 1e-5, None, h), "only with a delta"),
    ]
    for norm, what in bad:
        with pytest.raises(ValueError, match=what):
            w4a8_gemv_norm(x, packed, scale, None, 64, norm)


def test_norm_h_out_may_share_a_buffer_with_x_when_disjoint():
    """A [x; h] ping-pong buffer: disjoint rows of one allocation are accepted and h is written."""
    packed, scale, x, delta, nw, _ = _operands(2, 16, 64, 64, torch.float16)
    buf = torch.empty(4, 64, device=DEV, dtype=torch.float16)
    buf[:2] = x
    out = w4a8_gemv_norm(buf[:2], packed, scale, None, 64, NormIn(nw, 1e-5, delta, buf[2:]))
    assert torch.equal(buf[2:], fused.add_rms_norm(x, delta, nw, 1e-5)[0]) and out.shape == (2, 16)


def test_norm_without_outputs_still_writes_h():
    packed, scale, x, delta, nw, _ = _operands(2, 16, 64, 64, torch.float16)
    h = torch.zeros_like(x)
    out = w4a8_gemv_norm(x, packed[:0], scale[:0], None, 64, NormIn(nw, 1e-5, delta, h))
    assert out.shape == (2, 0) and torch.equal(h, (x.float() + delta.float()).half())
