"""The add + RMSNorm tail of the streaming W4A8 GEMV (gemv_dp4a.w4a8_gemv_add_norm, kernels/tail.py):
the GEMV's last program adds its output to the residual and normalizes the row.

It must give the values of the chain it replaces -- the stream GEMV, then fused.add_rms_norm -- bit
for bit, leave its arrival counter at zero for the next launch, and agree with pure torch. On CPU
under TRITON_INTERPRET; on a GPU the same tests plus Llama-sized shapes and back-to-back launches.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels import fused
from lowbit.kernels.tail import tail_counter
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_add_norm, w4a8_gemv_dp4a
from lowbit.kernels.w4a8.reference import act_quant_ref, int8_gemm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


def _operands(m, n, k, group, dtype, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen).to(DEV)
    scale = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001).to(DEV, dtype)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    res = torch.randn(m, n, generator=gen).to(DEV, dtype)
    w = (torch.rand(n, generator=gen) + 0.5).to(DEV, dtype)
    b = torch.randn(n, generator=gen).to(DEV, dtype) if bias else None
    return wq, scale, x, res, w, b


@pytest.mark.parametrize("m,n,k,group,dtype,bias", [
    (1, 64, 128, None, torch.bfloat16, False),
    (3, 96, 64, 32, torch.float16, True),  # 3 tokens in a 4-row block, group-wise, bias
    (4, 200, 96, None, torch.bfloat16, False),  # N and K not powers of two
    (2, 40, 256, None, torch.float16, False),
] + ([(1, 4096, 4096, None, torch.bfloat16, False), (1, 4096, 4096, 128, torch.bfloat16, False),
      (2, 4096, 4096, None, torch.float16, True), (4, 4096, 4096, None, torch.bfloat16, False)]
     if ON_GPU else []))
def test_add_norm_gemv_equals_the_kernel_chain(m, n, k, group, dtype, bias):
    wq, scale, x, res, w, b = _operands(m, n, k, group or k, dtype, bias)
    packed = pack_int4(wq)
    h, y = w4a8_gemv_add_norm(x, packed, scale, b, group or k, res, w, 1e-5)
    delta = w4a8_gemv_dp4a(x, packed, scale, b, group or k, kernel="stream")
    h2, y2 = fused.add_rms_norm(res, delta, w, 1e-5)
    assert h.shape == y.shape == (m, n) and h.dtype == y.dtype == dtype
    assert torch.equal(h, h2) and torch.equal(y, y2)
    assert tail_counter(x.device).item() == 0
    # against pure torch: reference W4A8 linear, eager add and RMSNorm
    qa, sa = act_quant_ref(x.float())
    ref = int8_gemm_ref(qa, sa, wq, scale, b, group or k, torch.float32).to(dtype)
    hr = res + ref
    yr = (hr.float() * torch.rsqrt(hr.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * w
    torch.testing.assert_close(h.float(), hr.float(), rtol=2e-2, atol=2e-2 * hr.abs().max().item())
    torch.testing.assert_close(y.float(), yr.float(), rtol=3e-2, atol=3e-2 * yr.abs().max().item())


def test_add_norm_gemv_back_to_back_launches():
    """Each launch leaves the counter at zero: many launches in a row (and on a GPU a CUDA-graph
    replay of several) keep giving the chain's values."""
    wq, scale, x, res, w, _ = _operands(2, 64, 64, 64, torch.float16)
    packed = pack_int4(wq)
    want = fused.add_rms_norm(res, w4a8_gemv_dp4a(x, packed, scale, None, 64, kernel="stream"), w, 1e-5)
    for _ in range(3):
        h, y = w4a8_gemv_add_norm(x, packed, scale, None, 64, res, w, 1e-5)
        assert torch.equal(h, want[0]) and torch.equal(y, want[1])
    if ON_GPU:
        outs = []
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(4):
                outs.append(w4a8_gemv_add_norm(x, packed, scale, None, 64, res, w, 1e-5))
        for _ in range(3):
            for o in outs:
                o[0].zero_()
                o[1].zero_()
            g.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(h, want[0]) and torch.equal(y, want[1]) for h, y in outs)
    assert tail_counter(x.device).item() == 0


def test_add_norm_gemv_bad_input():
    wq, scale, x, res, w, _ = _operands(2, 64, 64, 64, torch.float16)
    packed = pack_int4(wq)
    with pytest.raises(ValueError, match="fp16/bf16"):
        w4a8_gemv_add_norm(x.float(), packed, scale, None, 64, res, w, 1e-5)
    with pytest.raises(ValueError, match="residual must be"):
        w4a8_gemv_add_norm(x, packed, scale, None, 64, res[:, :32], w, 1e-5)
    with pytest.raises(ValueError, match="residual must be"):
        w4a8_gemv_add_norm(x, packed, scale, None, 64, res.float(), w, 1e-5)
    with pytest.raises(ValueError, match="norm weight"):
        w4a8_gemv_add_norm(x, packed, scale, None, 64, res, w.float(), 1e-5)
    with pytest.raises(ValueError, match="norm weight"):
        w4a8_gemv_add_norm(x, packed, scale, None, 64, res, w[:32], 1e-5)
    with pytest.raises(ValueError, match="K/2"):
        w4a8_gemv_add_norm(torch.randn(2, 128, device=DEV).half(), packed, scale, None, 64, res, w, 1e-5)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        w4a8_gemv_add_norm(torch.randn(5, 64, device=DEV).half(), packed, scale, None, 64,
                           torch.randn(5, 64, device=DEV).half(), w, 1e-5)
    assert tail_counter(x.device).item() == 0


def test_add_norm_gemv_noncontiguous_inputs():
    wq, scale, _, _, w, _ = _operands(2, 64, 128, 128, torch.float16)
    packed = pack_int4(wq)
    base = torch.randn(2, 256, device=DEV).half()
    rbase = torch.randn(2, 128, device=DEV).half()
    h, y = w4a8_gemv_add_norm(base[:, ::2], packed, scale, None, 128, rbase[:, ::2], w, 1e-5)
    h2, y2 = w4a8_gemv_add_norm(base[:, ::2].contiguous(), packed, scale, None, 128, rbase[:, ::2].contiguous(),
                                w, 1e-5)
    assert torch.equal(h, h2) and torch.equal(y, y2)
