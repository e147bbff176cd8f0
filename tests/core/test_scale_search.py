"""ScaleSearch.MSE never does worse than plain min/max, per block, in squared error."""

from __future__ import annotations

import pytest
import torch

from lowbit.core.granularity import PerGroup, PerRow
from lowbit.core.primitives import ScaleSearch, choose_qparams, dequantize, quantize
from lowbit.core.qtype import FLOAT8_E4M3, INT4, INT8, Mapping, ZeroPointDomain

COMBOS = [
    (Mapping.SYMMETRIC, ZeroPointDomain.NONE),
    (Mapping.SYMMETRIC, ZeroPointDomain.INT),
    (Mapping.ASYMMETRIC, ZeroPointDomain.INT),
    (Mapping.ASYMMETRIC, ZeroPointDomain.FLOAT),
]


def _block_sq_err(x, qtype, block, mapping, domain, search, scale_dtype=torch.float32):
    scale, zp = choose_qparams(x, qtype, block, mapping, domain, scale_dtype=scale_dtype, search=search)
    dq = dequantize(quantize(x, scale, zp, qtype, block, domain), scale, zp, block, domain)
    err = (dq - x.to(torch.float32)).double().square()
    n, k = x.shape
    return err.reshape(n // block[0], block[0], k // block[1], block[1]).sum(dim=(1, 3))


def _data(kind: str, shape=(32, 256)) -> torch.Tensor:
    if kind == "gauss":
        return torch.randn(shape)
    if kind == "heavy":  # Student-t like tails: outliers are where clipping pays
        return torch.randn(shape) / torch.rand(shape).clamp(min=0.05).sqrt()
    if kind == "skewed":
        return torch.rand(shape).pow(3) * 4 - 0.5
    raise AssertionError(kind)


@pytest.mark.parametrize("qtype", [INT4, INT8], ids=str)
@pytest.mark.parametrize("mapping,domain", COMBOS, ids=lambda v: v.value)
@pytest.mark.parametrize("kind", ["gauss", "heavy", "skewed"])
@pytest.mark.parametrize("gran", [PerGroup(32), PerGroup(128), PerRow()], ids=["g32", "g128", "row"])
def test_mse_never_worse_than_minmax(qtype, mapping, domain, kind, gran):
    x = _data(kind)
    block = gran.block_size(tuple(x.shape))
    e_minmax = _block_sq_err(x, qtype, block, mapping, domain, ScaleSearch.MINMAX)
    e_mse = _block_sq_err(x, qtype, block, mapping, domain, ScaleSearch.MSE)
    assert bool((e_mse <= e_minmax * (1 + 1e-6) + 1e-12).all()), float((e_mse - e_minmax).max())
    assert float(e_mse.sum()) <= float(e_minmax.sum())


@pytest.mark.parametrize("mapping,domain", COMBOS, ids=lambda v: v.value)
def test_mse_strictly_better_for_int4_with_outliers(mapping, domain):
    x = _data("heavy", (64, 512))
    block = PerGroup(128).block_size(tuple(x.shape))
    e_minmax = _block_sq_err(x, INT4, block, mapping, domain, ScaleSearch.MINMAX).sum()
    e_mse = _block_sq_err(x, INT4, block, mapping, domain, ScaleSearch.MSE).sum()
    assert float(e_mse) < 0.95 * float(e_minmax)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mse_never_worse_with_low_precision_scales(dtype):
    x = _data("heavy").to(dtype)
    block = PerGroup(64).block_size(tuple(x.shape))
    for mapping, domain in COMBOS:
        e_minmax = _block_sq_err(x, INT4, block, mapping, domain, ScaleSearch.MINMAX, dtype)
        e_mse = _block_sq_err(x, INT4, block, mapping, domain, ScaleSearch.MSE, dtype)
        assert bool((e_mse <= e_minmax * (1 + 1e-6) + 1e-12).all())


def test_mse_is_a_no_op_for_float8():
    x = _data("heavy")
    block = PerRow().block_size(tuple(x.shape))
    s1, _ = choose_qparams(x, FLOAT8_E4M3, block, search=ScaleSearch.MINMAX)
    s2, _ = choose_qparams(x, FLOAT8_E4M3, block, search=ScaleSearch.MSE)
    assert torch.equal(s1, s2)
