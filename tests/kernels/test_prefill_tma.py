"""The prefill int8 GEMM with TMA operand loads (persistent grid) and the one-launch
act_quant + weight expansion, against the pointer kernel and the pure-torch references.

On CPU through TRITON_INTERPRET=1 (small tiles); on a GPU compiled, where int8_gemm must also
route to the TMA kernel by itself on Hopper.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels.w4a8 import prefill
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.expand import quant_and_unpack, unpack_int4_triton
from lowbit.kernels.w4a8.prefill import TMA_CONFIG, int8_gemm, int8_gemm_tma, takes_tma, tma_operands_ok
from lowbit.kernels.w4a8.reference import act_quant_ref, int8_gemm_ref, unpack_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"
HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] >= 9
SMALL_CFG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
# float32 outputs take smaller tiles on the GPU: a 128x256 float32 tile and 4 operand stages do not
# fit in shared memory (int8_gemm then keeps the pointer kernel, see takes_tma)
GPU_F32_CFG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _cfg(dtype):
    if not ON_GPU:
        return SMALL_CFG
    return GPU_F32_CFG if dtype == torch.float32 else TMA_CONFIG


def _operands(m, n, k, group):
    qa = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
    qw = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    sa = torch.rand(m, 1, device=DEV) * 0.05 + 1e-3
    sw = torch.rand(n, k // group if group else 1, device=DEV) * 0.02 + 1e-3
    return qa, sa, qw, sw


@pytest.mark.skipif(ON_GPU and not HOPPER, reason="TMA descriptors need compute capability >= 9")
@pytest.mark.parametrize("m,n,k,group", [(1, 48, 96, None), (7, 40, 256, 128), (33, 72, 160, 32),
                                         (300, 24, 112, None)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tma_gemm_equals_pointer_kernel(m, n, k, group, dtype):
    # odd M, N and K (K a multiple of 16, as TMA needs); bias; several tiles per program
    qa, sa, qw, sw = _operands(m, n, k, group)
    bias = torch.randn(n, device=DEV).to(dtype)
    ref = int8_gemm(qa, sa, qw, sw, bias, group or k, dtype, tma=False)
    out = int8_gemm_tma(qa, sa, qw, sw, bias, group or k, dtype, _cfg(dtype), num_programs=3)
    assert out.dtype == dtype and out.shape == (m, n)
    # same integer sums and the same epilogue operations; compiled for the GPU, the two kernels may
    # contract the epilogue's multiply-adds differently (a last-bit difference in float32)
    if ON_GPU:
        torch.testing.assert_close(out, ref, rtol=4 * torch.finfo(dtype).eps, atol=1e-6)
    else:
        assert torch.equal(out, ref)
    exact = int8_gemm_ref(qa, sa, qw, sw, bias, group or k, dtype)
    print(f"max |tma - pointer| {(out.float() - ref.float()).abs().max().item():.3g}")
    assert torch.allclose(out.float(), exact.float(), rtol=2e-3, atol=1e-3)


@pytest.mark.skipif(ON_GPU and not HOPPER, reason="TMA descriptors need compute capability >= 9")
def test_tma_gemm_integer_accumulation_exact():
    m, n, k = 37, 40, 272  # K not a multiple of BLOCK_K: the last tile's columns read as zero
    qa, _, qw, _ = _operands(m, n, k, None)
    out = int8_gemm_tma(qa, torch.ones(m, 1, device=DEV), qw, torch.ones(n, 1, device=DEV), None, k,
                        torch.float32, _cfg(torch.float32))
    assert torch.equal(out, (qa.double() @ qw.double().t()).float())


def test_tma_operand_checks():
    qa = torch.zeros(5, 40, dtype=torch.int8, device=DEV)  # row stride 40 B: not 16-byte aligned
    qw = torch.zeros(8, 40, dtype=torch.int8, device=DEV)
    assert not tma_operands_ok(qa, qw)
    with pytest.raises(ValueError, match="16-byte aligned"):
        int8_gemm_tma(qa, torch.ones(5, 1, device=DEV), qw, torch.ones(8, 1, device=DEV), None, 40,
                      torch.float32, SMALL_CFG)
    wide = torch.zeros(5, 48, dtype=torch.int8, device=DEV)
    assert tma_operands_ok(wide, torch.zeros(8, 48, dtype=torch.int8, device=DEV))
    assert not tma_operands_ok(wide[:, 1:33], torch.zeros(8, 32, dtype=torch.int8, device=DEV))
    # int8_gemm itself takes misaligned operands through the pointer kernel, also at a size that
    # would take the TMA kernel on a Hopper GPU if K were a multiple of 16
    m, n, k = (2048, 4096, 1032) if ON_GPU else (5, 8, 40)
    qa, qw = torch.ones(m, k, dtype=torch.int8, device=DEV), torch.ones(n, k, dtype=torch.int8, device=DEV)
    assert not takes_tma(qa, qw, 0, torch.float16)
    ones_a, ones_w = torch.ones(m, 1, device=DEV), torch.ones(n, 1, device=DEV)
    out = int8_gemm(qa, ones_a, qw, ones_w, None, k, torch.float16)
    assert torch.equal(out, torch.full((m, n), float(k), device=DEV, dtype=torch.float16))
    # empty outputs need no descriptor; K = 0 is refused with the reason
    none = torch.zeros(0, 48, dtype=torch.int8, device=DEV)
    assert int8_gemm_tma(wide, torch.ones(5, 1, device=DEV), none, torch.ones(0, 1, device=DEV), None, 48,
                         torch.float16, SMALL_CFG).shape == (5, 0)
    with pytest.raises(ValueError, match="K > 0"):
        int8_gemm_tma(torch.zeros(5, 0, dtype=torch.int8, device=DEV), torch.ones(5, 1, device=DEV),
                      torch.zeros(8, 0, dtype=torch.int8, device=DEV), torch.ones(8, 1, device=DEV), None, 0,
                      torch.float16, SMALL_CFG)


def test_strided_scales_are_read_correctly():
    # group scales stored transposed and token scales as a column of a wider tensor
    m, n, k, g = 9, 24, 256, 64
    qa, _, qw, sw = _operands(m, n, k, g)
    sw_t = sw.t().contiguous().t()  # same values, strides (1, n)
    sa_wide = torch.rand(m, 2, device=DEV) + 0.1
    ref = int8_gemm_ref(qa, sa_wide[:, :1].contiguous(), qw, sw, None, g, torch.float32)
    sa_col, f32 = sa_wide[:, :1], torch.float32
    for fn in (lambda: int8_gemm(qa, sa_col, qw, sw_t, None, g, f32),
               lambda: int8_gemm_tma(qa, sa_col, qw, sw_t, None, g, f32, _cfg(f32))):
        torch.testing.assert_close(fn(), ref, rtol=1e-5, atol=1e-5)


def test_takes_tma_rules():
    qa = torch.zeros(4096, 4096, dtype=torch.int8, device=DEV)
    qw = torch.zeros(4096, 4096, dtype=torch.int8, device=DEV)
    bf16 = torch.bfloat16
    assert not takes_tma(qa, qw, 128, bf16)  # group-wise weights stay on the pointer kernel
    assert not takes_tma(qa, qw, 0, torch.float32)  # float32 tiles: see takes_tma
    assert not takes_tma(qa.cpu(), qw.cpu(), 0, bf16)
    assert not takes_tma(qa[:64], qw, 0, bf16)  # 1 x 16 tiles: fewer than the GPU's multiprocessors
    if HOPPER:
        assert takes_tma(qa, qw, 0, bf16) and takes_tma(qa, qw, 0, torch.float16)


@pytest.mark.parametrize("m,n,k", [(5, 7, 96), (3, 9, 10240), (65, 3, 9000), (0, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quant_and_unpack_equals_separate_kernels(m, n, k, dtype):
    x = (torch.randn(m, k, device=DEV) * 3).to(dtype)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    qa, sa, w8 = quant_and_unpack(x, pack_int4(q))
    qr, sr = act_quant_ref(x)
    assert torch.equal(qa, qr) and torch.equal(sa, sr)
    assert torch.equal(w8, q) and torch.equal(w8, unpack_ref(pack_int4(q)))
    if m:
        q2, s2 = act_quant(x)
        assert torch.equal(q2, qa) and torch.equal(s2, sa)
        assert torch.equal(unpack_int4_triton(pack_int4(q)), w8)


def test_quant_and_unpack_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="packed"):
        quant_and_unpack(torch.randn(3, 64, device=DEV), torch.zeros(4, 16, dtype=torch.uint8, device=DEV))


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU: int8_gemm's own routing to the TMA kernel")
@pytest.mark.parametrize("m,n,k", [(4000, 2000, 1040), (2048, 4096, 4096), (8192, 1024, 4096)])
def test_int8_gemm_routes_to_tma_on_hopper(m, n, k, monkeypatch):
    qa, sa, qw, sw = _operands(m, n, k, None)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    assert takes_tma(qa, qw, 0, torch.bfloat16)
    calls = []
    real = prefill.int8_gemm_tma
    monkeypatch.setattr(prefill, "int8_gemm_tma", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = int8_gemm(qa, sa, qw, sw, bias, k, torch.bfloat16)
    assert calls == [1]  # int8_gemm took the TMA kernel by itself
    ref = int8_gemm(qa, sa, qw, sw, bias, k, torch.bfloat16, tma=False)
    diff = (out.float() - ref.float()).abs()
    print(f"max |tma - pointer| {diff.max().item():.3g}, differing {int((diff > 0).sum())} of {diff.numel()}")
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-5)  # at most one bf16 rounding step
    exact = int8_gemm_ref(qa, sa, qw, sw, bias, k, torch.float32)
    torch.testing.assert_close(out.float(), exact, rtol=2**-7, atol=1e-4)
    # a float32 output at the same size stays on the pointer kernel and still runs
    out32 = int8_gemm(qa, sa, qw, sw, None, k, torch.float32)
    assert calls == [1]  # float32 output: the pointer kernel
    ref32 = int8_gemm_ref(qa, sa, qw, sw, None, k, torch.float32)
    torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [None, 32])
def test_long_prompts_run_in_row_chunks(group, monkeypatch):
    # M*K past the pointer kernel's int32 offsets: runs of rows into one output (limit lowered here)
    m, n, k = 300, 40, 128
    qa, sa, qw, sw = _operands(m, n, k, group)
    bias = torch.randn(n, device=DEV, dtype=torch.float16)
    want = int8_gemm(qa, sa, qw, sw, bias, group or k, torch.float16, tma=False)
    monkeypatch.setattr(prefill, "OFFSET_LIMIT", 100 * k + 5)  # 100 rows per run: 3 runs
    runs = []
    spy = lambda qa_, *a, **kw: runs.append(qa_.shape[0]) or int8_gemm(qa_, *a, **kw)  # noqa: E731
    monkeypatch.setattr(prefill, "int8_gemm", spy)
    got = int8_gemm(qa, sa, qw, sw, bias, group or k, torch.float16, tma=False)
    assert torch.equal(got, want) and runs == [100, 100, 100]
    monkeypatch.setattr(prefill, "OFFSET_LIMIT", n * k)  # the weight itself too large: a clear error
    with pytest.raises(ValueError, match="N\\*K must be < 2\\*\\*31"):
        int8_gemm(qa, sa, qw, sw, bias, group or k, torch.float16, tma=False)
