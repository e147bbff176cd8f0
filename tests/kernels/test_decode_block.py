"""The decode-layer GEMVs with folded RMSNorm / residual add / SwiGLU (kernels/w4a8/decode_block.py)
against their pure-torch reference.

CPU: Triton's interpreter (dp4a emulated), fp16; on a GPU also bf16 and Llama-sized shapes.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4
from lowbit.kernels.w4a8.decode_block import decode_gemv, decode_gemv_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]


def _weight(n, k, group, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    g = group or k
    scale = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.001).to(dtype)
    return pack_int4(q).to(DEV), scale.to(DEV), g


def _x(m, k, dtype, seed, amp=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen) * amp).to(dtype).to(DEV)


SHAPES = [(1, 256, 64, None), (3, 512, 96, 32), (2, 256, 160, None), (4, 384, 128, 128)]
if ON_GPU:
    SHAPES += [(1, 4096, 4096, None), (1, 4096, 11008, None), (2, 4096, 11008, 128)]


@pytest.mark.parametrize("m,dim,ffn,group", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_layer_gemvs_match_the_reference(m, dim, ffn, group, dtype):
    """qkv-style (norm), o-style (residual), gate/up (norm + SwiGLU) and down (amax + residual)."""
    x = _x(m, dim, dtype, 0, amp=3.0)
    nw = (torch.rand(dim, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype).to(DEV)
    res = _x(m, dim, dtype, 2)
    p, s, g = _weight(dim, dim, group, dtype, 3)
    for kw in (dict(), dict(norm_weight=nw, eps=1e-5), dict(residual=res), dict(norm_weight=nw, eps=1e-6,
                                                                              residual=res)):
        got, part = decode_gemv(x, p, s, g, **kw)
        want, _ = decode_gemv_ref(x, p, s, g, **kw)
        assert got.dtype == dtype and part.shape == (m, 0)
        # the differences allowed: the norm's float32 sum of squares and the group sums in another
        # order (a last-bit difference of the linear output before its rounding to the dtype)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    p13, s13, g13 = _weight(2 * ffn, dim, group, dtype, 4)
    hm, part = decode_gemv(x, p13, s13, g13, norm_weight=nw, eps=1e-5, swiglu=True)
    want_hm, want_max = decode_gemv_ref(x, p13, s13, g13, norm_weight=nw, eps=1e-5, swiglu=True)
    assert hm.shape == (m, ffn) and part.dim() == 2 and part.shape[0] == m and part.shape[1] >= 1
    torch.testing.assert_close(hm, want_hm, rtol=1e-2, atol=1e-2)
    # partial maxima: their max is exactly max |hm| of the kernel's own output
    assert torch.equal(part.amax(-1, keepdim=True), hm.abs().float().amax(-1, keepdim=True))
    torch.testing.assert_close(part.amax(-1, keepdim=True), want_max, rtol=1e-2, atol=1e-2)
    p2, s2, g2 = _weight(dim, ffn, group, dtype, 5)
    out, _ = decode_gemv(hm, p2, s2, g2, amax=part, residual=res)
    want_out, _ = decode_gemv_ref(hm, p2, s2, g2, amax=part, residual=res)  # act_quant(hm): same ints
    torch.testing.assert_close(out, want_out, rtol=1e-2, atol=1e-2 * want_out.abs().max().item())


def test_swiglu_rows_past_the_last_tile_do_not_count():
    """F not a multiple of the row tile: wrapped rows must not enter the partial maxima."""
    x = _x(1, 256, torch.float16, 7)
    p, s, g = _weight(2 * 36, 256, None, torch.float16, 8)
    hm, part = decode_gemv(x, p, s, g, swiglu=True)
    assert hm.shape == (1, 36)
    assert torch.equal(part.amax(-1, keepdim=True), hm.abs().float().amax(-1, keepdim=True))


def test_amax_that_is_not_the_activations_absmax_is_caught_by_the_reference():
    x = _x(1, 256, torch.float16, 9)
    p, s, g = _weight(64, 256, None, torch.float16, 10)
    with pytest.raises(ValueError, match="absmax"):
        decode_gemv_ref(x, p, s, g, amax=torch.ones(1, 3, device=DEV))


def test_bad_input_is_a_clear_error():
    x = _x(1, 256, torch.float16, 11)
    p, s, g = _weight(64, 256, None, torch.float16, 12)
    with pytest.raises(ValueError, match="M <= 4"):
        decode_gemv(_x(5, 256, torch.float16, 0), p, s, g)
    with pytest.raises(ValueError, match="fp16/bf16"):
        decode_gemv(x.float(), p, s, g)
    with pytest.raises(ValueError, match="packed must be"):
        decode_gemv(_x(1, 128, torch.float16, 0), p, s, g)
    with pytest.raises(ValueError, match="scale must be"):
        decode_gemv(x, p, s[:10], g)
    with pytest.raises(ValueError, match="norm_weight"):
        decode_gemv(x, p, s, g, norm_weight=torch.ones(128, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="residual"):
        decode_gemv(x, p, s, g, residual=torch.ones(1, 63, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="even"):
        pw, sw, gw = _weight(63, 256, None, torch.float16, 13)
        decode_gemv(x, pw, sw, gw, swiglu=True)
    with pytest.raises(ValueError, match="excludes"):
        decode_gemv(x, p, s, g, amax=torch.ones(1, 2, device=DEV), swiglu=True)
    with pytest.raises(ValueError, match="amax must be"):
        decode_gemv(x, p, s, g, amax=torch.ones(2, 2, device=DEV))
    with pytest.raises(ValueError, match="multiple of 32"):
        pk, sk, gk = _weight(64, 48, None, torch.float16, 14)
        decode_gemv(_x(1, 48, torch.float16, 0), pk, sk, gk)


def test_op_traces_with_its_fake():
    x = _x(2, 256, torch.float16, 15)
    nw = torch.ones(256, dtype=torch.float16, device=DEV)
    p, s, g = _weight(2 * 64, 256, None, torch.float16, 16)
    from lowbit.kernels.w4a8.decode_block import decode_gemv_op

    torch.library.opcheck(decode_gemv_op, (x, p, s, g), dict(norm_weight=nw, eps=1e-5, swiglu=True),
                          test_utils=("test_schema", "test_faketensor"))
