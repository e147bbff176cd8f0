"""Tier-1 tests: each W4A8 / int4 Triton kernel vs its pure-torch reference.

On CPU these run through TRITON_INTERPRET=1 (set by conftest) at small shapes; on a
GPU they run compiled, with larger real shapes added.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.decode import w4_decode
from lowbit.kernels.w4a8.expand import dequant_int4_triton, unpack_int4_triton
from lowbit.kernels.w4a8.prefill import int8_gemm
from lowbit.kernels.w4a8.reference import act_quant_ref, int8_gemm_ref, unpack_ref, w4_decode_ref
from lowbit.testing.sqnr import sqnr_db

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"
# fp32 epilogues vs a float32 reference: >= 50 dB (DESIGN tier 1); fp16/bf16 outputs are bounded by
# their rounding: ~2**-8 (bf16) / 2**-11 (fp16) relative -> >= 40 / 55 dB.
MIN_DB = {torch.float32: 50.0, torch.float16: 50.0, torch.bfloat16: 40.0}
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16, torch.float32]


def _weights(n: int, k: int, group: int | None):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    g = group or k
    scale = torch.rand(n, k // g, device=DEV) * 0.02 + 0.001
    return q, pack_int4(q), scale


SMALL = [(1, 48, 256, 64), (7, 40, 512, 128), (33, 64, 384, None), (3, 32, 512, 32)]
BIG = [(1, 4096, 4096, 128), (16, 11008, 4096, None), (300, 4096, 11008, 128), (2048, 4096, 4096, 128)]
SHAPES = SMALL + (BIG if ON_GPU else [])


@pytest.mark.parametrize("m,k", [(1, 64), (7, 300), (33, 5000), (3, 10000), (65, 9000)]
                         + ([(2048, 14336), (16, 14336)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_quant_bit_exact(m, k, dtype):
    x = (torch.randn(m, k, device=DEV) * 3).to(dtype)
    x[0, 0] = 0.0
    q, s = act_quant(x)
    qr, sr = act_quant_ref(x)
    assert torch.equal(q, qr)
    assert torch.equal(s, sr)


def test_act_quant_launch_rule():
    from lowbit.kernels.w4a8.act_quant import act_quant_launch

    assert act_quant_launch(4096, 16) == (4096, True, 8)  # decode batch
    assert act_quant_launch(4096, 64) == (4096, True, 4)  # prefill rows (measured at 8192 rows)
    assert act_quant_launch(2048, 1) == (2048, True, 4)
    assert act_quant_launch(10000, 3) == (16384, True, 16)  # decode batch, long row: one wide pass
    assert act_quant_launch(14336, 63) == (16384, True, 16)
    assert act_quant_launch(11008, 64) == (2048, False, 8)  # prefill: two passes
    assert act_quant_launch(20000, 4) == (4096, False, 4)  # past one 16384-wide block


def test_act_quant_zero_row_and_noncontiguous():
    x = torch.randn(8, 128, device=DEV, dtype=torch.float16)
    x[3] = 0
    xt = x.t().contiguous().t()  # same values, column-major strides
    q, s = act_quant(xt)
    qr, sr = act_quant_ref(x)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert torch.all(q[3] == 0)


def test_unpack_bit_exact_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8, device=DEV).repeat(37, 8)  # (37, 128), every nibble
    q = q[:, torch.randperm(128, device=DEV)]
    p = pack_int4(q)
    assert torch.equal(unpack_int4_triton(p), q)
    assert torch.equal(unpack_ref(p), q)


@pytest.mark.parametrize("m,n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_gemm_vs_reference(m, n, k, group, dtype):
    q, _, scale = _weights(n, k, group)
    x = torch.randn(m, k, device=DEV).to(dtype)
    qa, sa = act_quant_ref(x)
    bias = torch.randn(n, device=DEV).to(dtype)
    out = int8_gemm(qa, sa, q, scale, bias, group or k, dtype)
    ref = int8_gemm_ref(qa, sa, q, scale, bias, group or k, dtype)
    assert out.dtype == dtype and out.shape == (m, n)
    assert sqnr_db(ref.float(), out.float()) >= MIN_DB[dtype]


def test_int8_gemm_integer_accumulation_exact():
    # scales of 1 and |values| small enough that every float output is an exact integer.
    m, n, k = 33, 48, 256
    qa = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
    qw = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)
    ones_a = torch.ones(m, 1, device=DEV)
    ones_w = torch.ones(n, 1, device=DEV)
    out = int8_gemm(qa, ones_a, qw, ones_w, None, k, torch.float32)
    assert torch.equal(out, (qa.double() @ qw.double().t()).float())


@pytest.mark.parametrize("m,n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_int8", [True, False])
def test_decode_vs_reference(m, n, k, group, dtype, act_int8):
    if m > 64 and not ON_GPU:
        pytest.skip("interpreter: large M is covered by the prefill kernel test")
    _, packed, scale = _weights(n, k, group)
    scale = scale.to(dtype)
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype)
    ref = w4_decode_ref(x, packed, scale, None, bias, group or k, act_int8)
    if act_int8 and group is not None and group < 64:
        qa, sa = act_quant_ref(x)
        with pytest.raises(ValueError, match="group_size >= 64"):
            w4_decode(qa, sa, packed, scale, None, bias, group, dtype)
        return
    if act_int8:
        qa, sa = act_quant_ref(x)
        out = w4_decode(qa, sa, packed, scale, None, bias, group or k, dtype)
    else:
        out = w4_decode(x, None, packed, scale, None, bias, group or k, dtype)
    assert sqnr_db(ref.float(), out.float()) >= MIN_DB[dtype]


@pytest.mark.parametrize("group", [32, 128, None])
def test_decode_with_float_zero_and_split_k(group):
    n, k = 64, 1024
    _, packed, scale = _weights(n, k, group)
    zero = torch.randn_like(scale) * 0.01
    x = torch.randn(5, k, device=DEV, dtype=torch.float16)
    ref = w4_decode_ref(x, packed, scale.half(), zero.half(), None, group or k, False)
    for split in (1, 4):
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=max(group or 128, 128), SUB_K=group or 128,
                   SPLIT_K=split, num_warps=4, num_stages=2)
        out = w4_decode(x, None, packed, scale.half(), zero.half(), None, group or k, torch.float16,
                        config=cfg)
        assert sqnr_db(ref.float(), out.float()) >= MIN_DB[torch.float16]


@pytest.mark.parametrize("group", [64, None])
def test_dequant_kernel_matches_reference(group):
    n, k = 40, 256
    q, packed, scale = _weights(n, k, group)
    zero = torch.randn_like(scale) * 0.01
    g = group or k
    ref = (q.float().reshape(n, k // g, g) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(n, k)
    out = dequant_int4_triton(packed, scale, zero, g, torch.float32)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)


def test_decode_rejects_bad_input():
    _, packed, scale = _weights(32, 256, 64)
    x = torch.randn(2, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="does not match"):
        w4_decode(x, None, packed, scale, None, None, 64, torch.float16)
    qa = torch.zeros(2, 256, dtype=torch.int8, device=DEV)
    with pytest.raises(ValueError, match="per-token scales"):
        w4_decode(qa, None, packed, scale, None, None, 64, torch.float16)


@pytest.mark.parametrize("act_int8", [False, True])
def test_decode_reads_no_scale_past_the_end(act_int8):
    # K (256) shorter than the kernel's K step (512): the sub tiles past K have no group. Their
    # scale (and zero) must not be read: NaN right behind the tensors would poison the output.
    n, k, group = 48, 256, 64
    _, packed, scale = _weights(n, k, group)
    buf = torch.full((n * k // group + 64,), float("nan"), device=DEV, dtype=torch.float16)
    s = buf[: n * k // group].view(n, k // group)
    s.copy_(scale)
    zbuf = torch.full_like(buf, float("nan"))
    z = zbuf[: n * k // group].view(n, k // group)
    z.copy_(torch.randn(n, k // group) * 0.01)
    x = torch.randn(1, k, device=DEV).to(torch.float16)
    if act_int8:
        qa, sa = act_quant_ref(x)
        out = w4_decode(qa, sa, packed, s, None, None, group, torch.float16)
        ref = w4_decode_ref(x, packed, s, None, None, group, True)
    else:
        out = w4_decode(x, None, packed, s, z, None, group, torch.float16)
        ref = w4_decode_ref(x, packed, s, z, None, group, False)
    assert torch.isfinite(out).all()
    assert sqnr_db(ref.float(), out.float()) >= MIN_DB[torch.float16]


@pytest.mark.parametrize("m,n,k,group", [(1, 48, 256, 64), (3, 40, 512, 128), (4, 64, 512, None),
                                         (2, 32, 256, 32)] + ([(1, 22016, 4096, 128), (1, 4096, 11008, None)]
                                                              if ON_GPU else []))
@pytest.mark.parametrize("quant_a", [True, False])
def test_gemv_vs_reference(m, n, k, group, quant_a):
    from lowbit.kernels.w4a8.gemv import w4_gemv

    _, packed, scale = _weights(n, k, group)
    dtype = torch.float16
    x = torch.randn(m, k, device=DEV).to(dtype)
    bias = torch.randn(n, device=DEV).to(dtype)
    zero = None if quant_a else (torch.randn_like(scale) * 0.01).to(dtype)
    ref = w4_decode_ref(x, packed, scale.to(dtype), zero, bias, group or k, quant_a)
    out = w4_gemv(x, packed, scale.to(dtype), zero, bias, group or k, quant_a,
                  config=dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=1))
    assert sqnr_db(ref.float(), out.float()) >= MIN_DB[dtype]


@pytest.mark.parametrize("m,k", [(3, 256), (33, 1024)])
def test_act_quant_permuted_layout(m, k):
    from lowbit.kernels.w4a8.reference import permute_k

    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    q, s = act_quant(x, permute=True)
    qr, sr = act_quant_ref(x)
    assert torch.equal(q, permute_k(qr)) and torch.equal(s, sr)


@pytest.mark.parametrize("m,n,k,group", [(1, 48, 256, 128), (33, 64, 512, None), (70, 40, 512, 256)]
                         + ([(2048, 4096, 4096, 128), (300, 11008, 4096, None)] if ON_GPU else []))
def test_swapped_gemm_vs_reference(m, n, k, group):
    from lowbit.kernels.w4a8.swapped import w4a8_gemm_swapped

    q, packed, scale = _weights(n, k, group)
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    bias = torch.randn(n, device=DEV, dtype=torch.float16)
    qa, sa = act_quant(x, permute=True)
    out = w4a8_gemm_swapped(qa, sa, packed, scale, bias, group or k, torch.float16)
    qr, srr = act_quant_ref(x)
    ref = int8_gemm_ref(qr, srr, q, scale, bias, group or k, torch.float16)
    assert sqnr_db(ref.float(), out.float()) >= MIN_DB[torch.float16]


@pytest.mark.parametrize("m,n,k,group", [(1, 48, 256, 64), (3, 40, 512, 128), (4, 64, 512, None),
                                         (2, 32, 256, 32), (1, 40, 1024, 256)]
                         + ([(1, 22016, 4096, 128), (1, 4096, 11008, None), (4, 4096, 4096, 128),
                              (3, 12288, 4096, None)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["stream", "blocked"])
def test_dp4a_gemv_vs_reference(m, n, k, group, dtype, kernel):
    from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a

    q, packed, scale = _weights(n, k, group)
    scale = scale.to(dtype)
    x = torch.randn(m, k, device=DEV).to(dtype)
    x[0, :5] = torch.tensor([0.0, -8.0, 8.0, 3.3, -0.1])
    bias = torch.randn(n, device=DEV).to(dtype)
    ref = w4_decode_ref(x, packed, scale, None, bias, group or k, True)
    small = dict(BLOCK_N=16, BLOCK_K=256 if (group or 0) <= 256 and k % 256 == 0 else 128, num_warps=4)
    if kernel == "stream":
        # few programs, so each walks several row tiles; one or two tiles in flight
        small = dict(BLOCK_N=4, PPS=1, DEPTH=1 + m % 2, num_warps=4)
    cfg = None if n >= 4096 else small
    out = w4a8_gemv_dp4a(x, packed, scale, bias, group or k, config=cfg, kernel=kernel)
    assert sqnr_db(ref.float(), out.float()) >= MIN_DB[dtype]


def test_dp4a_integer_part_exact():
    # unit scales, x already on the int8 grid with amax 127 (sa = 1): output == exact integer dot
    from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a

    n, k = 32, 256
    q, packed, _ = _weights(n, k, None)
    qx = torch.randint(-127, 128, (1, k), device=DEV).float()
    qx[0, 0] = 127
    out = w4a8_gemv_dp4a(qx, packed, torch.ones(n, 1, device=DEV), None, k,
                         config=dict(BLOCK_N=16, BLOCK_K=128, num_warps=4), kernel="blocked")
    assert torch.equal(out, (qx.double() @ q.double().t()).float())
    out = w4a8_gemv_dp4a(qx, packed, torch.ones(n, 1, device=DEV), None, k,
                         config=dict(BLOCK_N=2, PPS=1, DEPTH=2, num_warps=4), kernel="stream")
    assert torch.equal(out, (qx.double() @ q.double().t()).float())



@pytest.mark.parametrize("group", [None, 64])
def test_decode_split_k_with_a_shorter_last_split(group):
    """K = 7 steps over 3 splits (3, 3, 1 steps): every split is whole K steps, so the unmasked
    K loop runs; the partial sums must still add up to the reference."""
    from lowbit.kernels.w4a8.reference import w4_decode_ref

    n, k, m = 40, 448, 5
    q, packed, scale = _weights(n, k, group)
    x = torch.randn(m, k, device=DEV)
    qa, sa = act_quant(x)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SUB_K=64, SPLIT_K=3, num_warps=4, num_stages=2)
    y = w4_decode(qa, sa, packed, scale, None, None, group or k, torch.float32, config=cfg)
    ref = w4_decode_ref(x, packed, scale, None, None, group or k, True).float()
    assert sqnr_db(y, ref) >= MIN_DB[torch.float32]


@pytest.mark.parametrize("k", [64, 96])
def test_decode_int8_per_row_short_rows(k):
    """Per-row W4A8 rows shorter than a default K step: 64-wide steps (int8 MMAs need K >= 32 per
    dot, i.e. 64 columns split into even/odd halves); K < 64 is refused with a clear error."""
    from lowbit.kernels.w4a8.reference import w4_decode_ref

    q, packed, scale = _weights(48, k, None)
    x = torch.randn(7, k, device=DEV)
    qa, sa = act_quant(x)
    y = w4_decode(qa, sa, packed, scale, None, None, k, torch.float32)
    ref = w4_decode_ref(x, packed, scale, None, None, k, True).float()
    assert sqnr_db(y, ref) >= MIN_DB[torch.float32]
    q32, p32, s32 = _weights(48, 32, None)
    qa32, sa32 = act_quant(torch.randn(7, 32, device=DEV))
    with pytest.raises(ValueError, match="K >= 64"):
        w4_decode(qa32, sa32, p32, s32, None, None, 32, torch.float32)
