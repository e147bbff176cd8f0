"""choose_qparams / quantize / dequantize over qtype x mapping x zero_point_domain x granularity."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.core.granularity import PerGroup, PerRow, PerTensor, PerToken
from lowbit.core.primitives import choose_qparams, dequantize, quantize, quantize_per_token_sym
from lowbit.core.qtype import (
    FLOAT8_E4M3,
    FLOAT8_E5M2,
    INT4,
    INT8,
    INT8_SYM,
    Mapping,
    ZeroPointDomain,
    check_mapping_domain,
)

INT_QTYPES = [INT4, INT8]
GRANULARITIES = [PerTensor(), PerRow(), PerToken(), PerGroup(32)]
VALID = [
    (Mapping.SYMMETRIC, ZeroPointDomain.NONE),
    (Mapping.SYMMETRIC, ZeroPointDomain.INT),
    (Mapping.ASYMMETRIC, ZeroPointDomain.INT),
    (Mapping.ASYMMETRIC, ZeroPointDomain.FLOAT),
]
INVALID = [
    (Mapping.SYMMETRIC, ZeroPointDomain.FLOAT, "['none', 'int']"),
    (Mapping.ASYMMETRIC, ZeroPointDomain.NONE, "['int', 'float']"),
]


def _weight(shape: tuple[int, ...] = (8, 128), shift: float = 0.0) -> torch.Tensor:
    # Rows with different ranges and signs so per-block parameters really differ.
    w = torch.randn(shape) * torch.linspace(0.1, 3.0, shape[0]).unsqueeze(-1)
    return w + shift


def _round_trip(x, qtype, gran, mapping, domain):
    block = gran.block_size(tuple(x.shape))
    scale, zp = choose_qparams(x, qtype, block, mapping, domain)
    q = quantize(x, scale, zp, qtype, block, domain)
    dq = dequantize(q, scale, zp, block, domain)
    return block, scale, zp, q, dq


def _per_element(t: torch.Tensor, shape: tuple[int, ...], block: tuple[int, ...]) -> torch.Tensor:
    out = t
    for dim, b in enumerate(block):
        out = out.repeat_interleave(b, dim=dim)
    return out.reshape(shape)


@pytest.mark.parametrize("qtype", INT_QTYPES, ids=str)
@pytest.mark.parametrize("mapping,domain", VALID, ids=lambda v: v.value)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=lambda g: type(g).__name__)
@pytest.mark.parametrize("shift", [0.0, 2.5], ids=["centered", "shifted"])
def test_valid_combo_round_trip_error_within_half_scale(qtype, mapping, domain, gran, shift):
    x = _weight(shift=shift)
    block, scale, zp, q, dq = _round_trip(x, qtype, gran, mapping, domain)
    expected_blocks = tuple(s // b for s, b in zip(x.shape, block))
    assert tuple(scale.shape) == expected_blocks
    assert q.dtype == qtype.storage
    assert int(q.min()) >= qtype.qmin and int(q.max()) <= qtype.qmax
    if domain is ZeroPointDomain.NONE:
        assert zp is None
    elif domain is ZeroPointDomain.INT:
        assert zp.dtype == torch.int8 and tuple(zp.shape) == expected_blocks
        assert int(zp.min()) >= qtype.qmin and int(zp.max()) <= qtype.qmax
    else:
        assert zp.is_floating_point() and tuple(zp.shape) == expected_blocks
    # min/max scales cover every element, so each one rounds to its nearest grid point.
    half = _per_element(scale, tuple(x.shape), block) / 2
    err = (dq - x).abs()
    assert bool((err <= half * (1 + 1e-5) + 1e-6).all()), float((err - half).max())
    # And the grid is used: the error is not trivially tiny (the test could tell a no-op).
    assert float(err.max()) > float(half.min()) * 0.2


@pytest.mark.parametrize("qtype", INT_QTYPES, ids=str)
@pytest.mark.parametrize("mapping", list(Mapping), ids=lambda m: m.value)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=lambda g: type(g).__name__)
def test_int_domain_represents_zero_exactly(qtype, mapping, gran):
    x = _weight(shift=1.7)  # every block strictly positive: zero lies outside the data range
    x[:, ::5] = 0.0
    _, _, zp, _, dq = _round_trip(x, qtype, gran, mapping, ZeroPointDomain.INT)
    assert zp is not None
    zeros = x == 0
    assert bool(zeros.any())
    assert torch.equal(dq[zeros], torch.zeros_like(dq[zeros]))


@pytest.mark.parametrize("qtype", INT_QTYPES, ids=str)
def test_symmetric_int_domain_zero_point_is_zero_and_matches_none(qtype):
    x = _weight()
    block = PerGroup(32).block_size(tuple(x.shape))
    s_none, z_none = choose_qparams(x, qtype, block, Mapping.SYMMETRIC, ZeroPointDomain.NONE)
    s_int, z_int = choose_qparams(x, qtype, block, Mapping.SYMMETRIC, ZeroPointDomain.INT)
    assert z_none is None
    assert torch.equal(z_int, torch.zeros_like(z_int))
    assert torch.equal(s_none, s_int)
    q_none = quantize(x, s_none, None, qtype, block, ZeroPointDomain.NONE)
    q_int = quantize(x, s_int, z_int, qtype, block, ZeroPointDomain.INT)
    assert torch.equal(q_none, q_int)


@pytest.mark.parametrize("qtype", INT_QTYPES, ids=str)
@pytest.mark.parametrize("mapping,domain", VALID, ids=lambda v: v.value)
def test_all_zero_and_constant_blocks_round_trip(qtype, mapping, domain):
    x = torch.zeros(4, 64)
    x[1] = 0.75  # a constant, non-zero block
    x[2, :32] = -2.0
    block = PerGroup(32).block_size(tuple(x.shape))
    scale, zp = choose_qparams(x, qtype, block, mapping, domain)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    dq = dequantize(quantize(x, scale, zp, qtype, block, domain), scale, zp, block, domain)
    assert bool(torch.isfinite(dq).all())
    torch.testing.assert_close(dq, x, atol=float(scale.max()) / 2 + 1e-6, rtol=0)
    assert torch.equal(dq[0], x[0])  # the all-zero row stays exactly zero


@pytest.mark.parametrize("qtype", INT_QTYPES, ids=str)
@pytest.mark.parametrize("mapping,domain,allowed", INVALID, ids=["symmetric-float", "asymmetric-none"])
@pytest.mark.parametrize("gran", GRANULARITIES, ids=lambda g: type(g).__name__)
def test_invalid_int_combos_raise_naming_allowed(qtype, mapping, domain, allowed, gran):
    x = _weight()
    block = gran.block_size(tuple(x.shape))
    with pytest.raises(ValueError, match="zero_point_domain") as info:
        choose_qparams(x, qtype, block, mapping, domain)
    assert allowed in str(info.value)
    assert domain.value in str(info.value)


@pytest.mark.parametrize("qtype", [FLOAT8_E4M3, FLOAT8_E5M2], ids=str)
def test_float8_rejects_zero_points_and_asymmetric(qtype):
    x = _weight()
    block = PerRow().block_size(tuple(x.shape))
    for domain in (ZeroPointDomain.FLOAT, ZeroPointDomain.INT):
        with pytest.raises(ValueError, match=r"allowed: \['none'\]"):
            choose_qparams(x, qtype, block, Mapping.SYMMETRIC, domain)
    with pytest.raises(ValueError, match=r"mapping='asymmetric'.*allowed: \['symmetric'\]"):
        choose_qparams(x, qtype, block, Mapping.ASYMMETRIC, ZeroPointDomain.FLOAT)


@pytest.mark.parametrize("qtype", [FLOAT8_E4M3, FLOAT8_E5M2], ids=str)
@pytest.mark.parametrize("gran", [PerTensor(), PerRow(), PerGroup(32)], ids=lambda g: type(g).__name__)
def test_float8_round_trip_relative_error(qtype, gran):
    x = _weight()
    block = gran.block_size(tuple(x.shape))
    scale, zp = choose_qparams(x, qtype, block, Mapping.SYMMETRIC, ZeroPointDomain.NONE)
    assert zp is None
    q = quantize(x, scale, None, qtype, block)
    assert q.dtype == qtype.storage
    dq = dequantize(q, scale, None, block)
    # float8 rounds to nearest: relative error <= 2^-(mantissa bits + 1) above the subnormal range.
    mantissa = 3 if qtype is FLOAT8_E4M3 else 2
    big = x.abs() > _per_element(scale, tuple(x.shape), block) * 2.0**-4
    rel = ((dq - x).abs() / x.abs())[big]
    assert float(rel.max()) <= 2.0 ** -(mantissa + 1) * (1 + 1e-3)
    # The block maximum maps onto the largest finite float8 value.
    assert float(q.to(torch.float32).abs().max()) == qtype.qmax


def test_check_mapping_domain_accepts_every_valid_combo():
    for qtype, (mapping, domain) in itertools.product(INT_QTYPES, VALID):
        check_mapping_domain(qtype, mapping, domain)
    check_mapping_domain(FLOAT8_E4M3, Mapping.SYMMETRIC, ZeroPointDomain.NONE)


@pytest.mark.parametrize("block", [(8,), (1, 128, 1), (3, 128), (1, 48), (0, 128)], ids=str)
def test_bad_block_size_raises(block):
    x = _weight()
    with pytest.raises(ValueError, match="block_size"):
        choose_qparams(x, INT8, block)
    with pytest.raises(ValueError, match="block_size"):
        quantize(x, torch.ones(1), None, INT8, block)


@pytest.mark.parametrize("bad", [0, -32, 2.0, None])
def test_pergroup_validates_group_size(bad):
    with pytest.raises(ValueError, match="group_size"):
        PerGroup(bad)


def test_pergroup_rejects_indivisible_k():
    with pytest.raises(ValueError, match="K=100 is not divisible by group_size=32"):
        PerGroup(32).block_size((8, 100))


def test_granularity_block_sizes():
    assert PerTensor().block_size((8, 128)) == (8, 128)
    assert PerRow().block_size((8, 128)) == (1, 128)
    assert PerToken().block_size((2, 3, 128)) == (1, 1, 128)
    assert PerGroup(32).block_size((8, 128)) == (1, 32)


@pytest.mark.parametrize("shape", [(7, 96), (2, 3, 96), (1, 96)], ids=str)
@pytest.mark.parametrize("qtype", [INT8_SYM, FLOAT8_E4M3], ids=str)
def test_quantize_per_token_sym(shape, qtype):
    x = torch.randn(shape) * 4
    x[..., 0, :] = 0.0  # an all-zero token must stay finite and exactly zero
    q, s = quantize_per_token_sym(x, qtype)
    assert q.dtype == qtype.storage and q.shape == x.shape
    assert tuple(s.shape) == shape[:-1] + (1,)
    assert bool(torch.isfinite(s).all())
    qf = q.to(torch.float32)
    assert float(qf.abs().max()) <= qtype.qmax
    dq = qf * s
    assert torch.equal(dq[..., 0, :], torch.zeros_like(dq[..., 0, :]))
    if not qtype.is_float:
        assert int(q.min()) >= -127  # symmetric grid: -128 never used
        assert bool(((dq - x).abs() <= s / 2 * (1 + 1e-5) + 1e-7).all())
    else:
        torch.testing.assert_close(dq, x, rtol=2.0**-4, atol=float(s.max()) * 2.0**-6)
