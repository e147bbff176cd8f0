"""W4A8 GEMV from pre-quantized activations (gemv_q.py) against the pure-torch reference.

On CPU the kernel runs under TRITON_INTERPRET (dp4a and prmt emulated with shifts); on a GPU the
same tests run the PTX instructions, plus the Llama-sized shapes.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_q
from lowbit.kernels.w4a8.reference import act_quant_ref, int8_gemm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"


def _case(m, n, k, group):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    q[0, :16] = torch.tensor([-8, 7] * 8, dtype=torch.int8)  # the extreme nibbles
    g = group or k
    scale = torch.rand(n, k // g, device=DEV) * 0.02 + 0.001
    x = torch.randn(m, k, device=DEV)
    x[0, :3] = torch.tensor([0.0, -9.0, 9.0])  # -> -127 / 127 on row 0
    qa, sa = act_quant_ref(x)
    return q, pack_int4(q), scale, qa, sa


@pytest.mark.parametrize("m,n,k,group,cfg", [
    (1, 48, 256, None, dict(BLOCK_N=4, BLOCK_W=8, num_warps=2)),  # 4 chunks
    (3, 40, 352, None, dict(BLOCK_N=8, BLOCK_W=16, num_warps=2)),  # K=352: 44 words, partial last chunk
    (4, 33, 512, 128, dict(BLOCK_N=4, BLOCK_W=16, num_warps=2)),  # N not a multiple of BLOCK_N
    (2, 32, 480, 32, dict(BLOCK_N=4, BLOCK_W=8, num_warps=2)),  # 15 groups, 2 per chunk, partial last
    (1, 16, 1024, 256, None),
] + ([(1, 4096, 11008, None, None), (1, 22016, 4096, 128, None), (4, 4096, 4096, None, None),
      (3, 12288, 4096, 128, None)] if ON_GPU else []))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_gemv_q_vs_reference(m, n, k, group, cfg, out_dtype):
    q, packed, scale, qa, sa = _case(m, n, k, group)
    bias = torch.randn(n, device=DEV)
    ref = int8_gemm_ref(qa, sa, q, scale, bias, group or k, torch.float64 if out_dtype == torch.float32
                        else out_dtype)
    out = w4a8_gemv_q(qa, sa, packed, scale, bias, group or k, out_dtype, config=cfg)
    assert out.dtype == out_dtype and out.shape == (m, n)
    if out_dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("group", [None, 64])
def test_gemv_q_integer_part_exact(group):
    # unit scales: the output is the exact integer dot (every value far below 2**24)
    n, k = 24, 320
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    qa = torch.randint(-127, 128, (2, k), dtype=torch.int8, device=DEV)
    ones = torch.ones(n, k // (group or k), device=DEV)
    out = w4a8_gemv_q(qa, torch.ones(2, 1, device=DEV), pack_int4(q), ones, None, group or k, torch.float32,
                      config=dict(BLOCK_N=8, BLOCK_W=8, num_warps=2))
    assert torch.equal(out, (qa.double() @ q.double().t()).float())


def test_gemv_q_bad_input():
    q, packed, scale, qa, sa = _case(1, 16, 256, None)
    with pytest.raises(ValueError, match="int8"):
        w4a8_gemv_q(qa.float(), sa, packed, scale, None, 256, torch.float16)
    with pytest.raises(ValueError, match="does not match"):
        w4a8_gemv_q(qa[:, :128], sa, packed, scale, None, 256, torch.float16)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        w4a8_gemv_q(qa.expand(5, -1), sa.expand(5, -1), packed, scale, None, 256, torch.float16)
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a8_gemv_q(qa[:, :200], sa, packed[:, :100], scale, None, 200, torch.float16)
    with pytest.raises(ValueError, match="scale must be"):
        w4a8_gemv_q(qa, sa, packed, torch.ones(16, 2, device=DEV), None, 64, torch.float16)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        w4a8_gemv_q(qa[:, :96], sa, packed[:, :48], torch.ones(16, 2, device=DEV), None, 64, torch.float16)
    with pytest.raises(ValueError, match="whole groups"):
        w4a8_gemv_q(qa, sa, packed, torch.ones(16, 2, device=DEV), None, 128, torch.float16,
                    config=dict(BLOCK_N=4, BLOCK_W=8, num_warps=2))


def test_gemv_q_noncontiguous_activations():
    q, packed, scale, qa, sa = _case(2, 16, 256, None)
    wide = torch.zeros(2, 512, dtype=torch.int8, device=DEV)
    wide[:, 1::2] = qa  # a strided view holding the same values
    ref = w4a8_gemv_q(qa, sa, packed, scale, None, 256, torch.float32)
    out = w4a8_gemv_q(wide[:, 1::2], sa, packed, scale, None, 256, torch.float32)
    assert torch.equal(out, ref)


def test_gemv_q_transposed_scale():
    q, packed, scale, qa, sa = _case(1, 24, 256, 64)
    want = w4a8_gemv_q(qa, sa, packed, scale, None, 64, torch.float32)
    got = w4a8_gemv_q(qa, sa, packed, scale.t().contiguous().t(), None, 64, torch.float32)
    assert torch.equal(got, want)
