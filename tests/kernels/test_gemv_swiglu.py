"""SwiGLU inside the streaming W4A8 GEMV (gemv_dp4a.w4a8_gemv_swiglu) and the quantization of its
output from the per-program absmaxes (act_quant.act_quant_from_amax).

The fused kernel must give the integers and roundings of the chain it replaces: the stream GEMV's
[gate; up] output, then fused.swiglu, then act_quant. On CPU under TRITON_INTERPRET; on a GPU the
same tests plus Llama-sized shapes.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels import fused
from lowbit.kernels.w4a8.act_quant import act_quant, act_quant_from_amax
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a, w4a8_gemv_swiglu
from lowbit.kernels.w4a8.reference import act_quant_ref, int8_gemm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


def _weight(n, k, group, dtype):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    scale = (torch.rand(n, k // group, device=DEV) * 0.02 + 0.001).to(dtype)
    return q, pack_int4(q), scale


@pytest.mark.parametrize("m,f,k,group,dtype,bias", [
    (1, 40, 256, None, torch.bfloat16, False),
    (2, 22, 64, None, torch.float16, True),  # F not a multiple of the tile's output columns
    (3, 24, 128, 32, torch.float16, True),  # 3 tokens in a 4-row block, group-wise
    (4, 37, 96, None, torch.bfloat16, False),  # K not a power of two (padded in registers)
] + ([(1, 11008, 4096, None, torch.bfloat16, False), (1, 14336, 4096, 128, torch.bfloat16, False),
      (2, 5504, 4096, None, torch.float16, True)] if ON_GPU else []))
def test_swiglu_gemv_equals_the_kernel_chain(m, f, k, group, dtype, bias):
    q, packed, scale = _weight(2 * f, k, group or k, dtype)
    x = torch.randn(m, k, device=DEV).to(dtype)
    b = torch.randn(2 * f, device=DEV).to(dtype) if bias else None
    h, amax = w4a8_gemv_swiglu(x, packed, scale, b, group or k)
    gu = w4a8_gemv_dp4a(x, packed, scale, b, group or k, kernel="stream")
    assert h.shape == (m, f) and h.dtype == dtype
    assert torch.equal(h, fused.swiglu(gu))
    # every program reported: the partial maxima reduce to each row's absmax
    assert amax.dim() == 2 and amax.shape[0] == m and amax.dtype == torch.float32
    assert torch.equal(amax.amax(1), h.float().abs().amax(1))
    # and against pure torch: reference W4A8 linear, then the eager SwiGLU
    qa, sa = act_quant_ref(x.float())
    ref = int8_gemm_ref(qa, sa, q, scale, b, group or k, torch.float32).to(dtype)
    g, u = ref.chunk(2, dim=-1)
    want = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(h.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # the int8 rows of the next linear, without a pass over h before quantizing
    qh, sh = act_quant_from_amax(h, amax)
    q2, s2 = act_quant(h)
    assert torch.equal(qh, q2) and torch.equal(sh, s2)
    qr, sr = act_quant_ref(h)
    assert torch.equal(qh, qr) and torch.equal(sh, sr)


def test_act_quant_from_amax_uses_the_given_maxima():
    x = torch.randn(3, 2500, device=DEV).to(torch.float16)  # 3 chunks of 1024, the last partial
    x[1] = 0.0
    amax = torch.stack([x.float().abs().amax(1), torch.zeros(3, device=DEV)], 1)  # a zero partial
    q, s = act_quant_from_amax(x, amax)
    qr, sr = act_quant_ref(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert torch.isfinite(s).all() and (q[1] == 0).all()
    # a larger reported maximum is what the quantization uses (it trusts its caller)
    q2, s2 = act_quant_from_amax(x, amax * 2)
    assert torch.equal(s2, (amax.amax(1, keepdim=True) * 2 / 127).clamp(min=torch.finfo(torch.float32).tiny))
    assert q2.abs().max() <= 64


def test_swiglu_gemv_bad_input():
    _, packed, scale = _weight(2 * 16, 64, 64, torch.float16)
    x = torch.randn(1, 64, device=DEV).to(torch.float16)
    with pytest.raises(ValueError, match="fp16/bf16"):
        w4a8_gemv_swiglu(x.float(), packed, scale, None, 64)
    with pytest.raises(ValueError, match="2F"):
        w4a8_gemv_swiglu(x, packed[:31], scale[:31], None, 64)  # odd N
    with pytest.raises(ValueError, match="K/2"):
        w4a8_gemv_swiglu(torch.randn(1, 128, device=DEV).half(), packed, scale, None, 64)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        w4a8_gemv_swiglu(torch.randn(5, 64, device=DEV).half(), packed, scale, None, 64)
    with pytest.raises(ValueError, match="does not take"):  # more tokens than the streamer holds
        w4a8_gemv_swiglu(torch.randn(4, 8192, device=DEV).half(),
                         torch.zeros(32, 4096, dtype=torch.uint8, device=DEV),
                         torch.ones(32, 1, device=DEV).half(), None, 8192)
    with pytest.raises(ValueError, match="amax"):
        act_quant_from_amax(x, torch.zeros(2, 4, device=DEV))
    with pytest.raises(ValueError, match="amax"):
        act_quant_from_amax(x, torch.zeros(1, 4, device=DEV, dtype=torch.float16))


def test_swiglu_gemv_noncontiguous_activations():
    _, packed, scale = _weight(2 * 24, 128, 128, torch.float16)
    base = torch.randn(2, 256, device=DEV).half()
    x = base[:, ::2]
    h, _ = w4a8_gemv_swiglu(x, packed, scale, None, 128)
    h2, _ = w4a8_gemv_swiglu(x.contiguous(), packed, scale, None, 128)
    assert torch.equal(h, h2)
