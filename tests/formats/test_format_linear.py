"""Every format runs F.linear on CPU in fp32 / bf16 / fp16, and the references agree with the math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig
from lowbit.core.primitives import quantize_per_token_sym
from lowbit.core.qtype import INT8_SYM, qtype_by_name
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.float8 import Float8Tensor
from lowbit.formats.int4 import Int4Tensor
from lowbit.formats.int8 import Int8Tensor
from lowbit.testing import MIN_SQNR_DB, config_for, sqnr_db

LOW_PRECISION_MARGIN_DB = 3.0  # bf16/fp16 activations and scales cost a little, never more than this


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead", [(1,), (7,), (33,), (2, 3)], ids=str)
def test_linear_runs_in_every_dtype(format_name, dtype, lead):
    lin = torch.nn.Linear(256, 64)
    x = torch.randn(*lead, 256)
    ref = lin(x)
    model = copy.deepcopy(lin).to(dtype)
    lowbit.quantize_(model, config_for(format_name))
    assert isinstance(model.weight, QuantizedTensor)
    assert model.weight.dtype == dtype and model.weight.shape == (64, 256)
    with torch.no_grad():
        out = model(x.to(dtype))
    assert out.dtype == dtype and out.shape == (*lead, 64)
    floor = MIN_SQNR_DB[format_name] - (0.0 if dtype is torch.float32 else LOW_PRECISION_MARGIN_DB)
    got = sqnr_db(ref, out)
    assert got >= floor, f"{format_name} {dtype}: {got:.1f} dB < {floor}"


def test_dequantize_shape_dtype_and_weight_only_path(format_name):
    w = torch.randn(32, 256)
    qw = config_for(format_name).quantize_weight(w)
    for dtype in (torch.float32, torch.bfloat16):
        dq = qw.dequantize(dtype)
        assert dq.dtype == dtype and dq.shape == w.shape and type(dq) is torch.Tensor
    assert sqnr_db(w, qw.dequantize()) >= MIN_SQNR_DB[format_name]
    assert qw.nbytes_stored() < w.numel() * w.element_size() / 3
    if qw.act_quant is None:  # weight-only: exactly the high-precision matmul on dequantized weights
        x = torch.randn(5, 256)
        torch.testing.assert_close(F.linear(x, qw), F.linear(x, qw.dequantize()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize(
    "mapping,domain",
    [("symmetric", "none"), ("symmetric", "int"), ("asymmetric", "int"), ("asymmetric", "float")],
)
def test_w4a8_reference_equals_dequantized_math(group_size, mapping, domain):
    # Independent of the integer group-dot path: dequantize both operands and matmul in float64.
    cfg = Int8DynamicActivationInt4WeightConfig(
        group_size=group_size, mapping=mapping, zero_point_domain=domain
    )
    w = torch.randn(48, 256) + 0.3
    x = torch.randn(9, 256) * 3
    qw = cfg.quantize_weight(w)
    qx, sx = quantize_per_token_sym(x, INT8_SYM)
    expect = (qx.double() * sx.double()) @ qw.dequantize(torch.float32).double().t()
    torch.testing.assert_close(F.linear(x, qw).double(), expect, rtol=1e-5, atol=1e-4)
    assert sqnr_db(x @ w.t(), F.linear(x, qw)) >= MIN_SQNR_DB["w4a8"]


@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("domain", ["int", "float"])
def test_int4_weight_only_asymmetric_domains(group_size, domain):
    cfg = Int4WeightOnlyConfig(group_size=group_size, zero_point_domain=domain)
    w = torch.randn(48, 256) + 0.5  # not centred: asymmetric grids matter
    qw = cfg.quantize_weight(w)
    assert isinstance(qw, Int4Tensor) and qw.qdata.dtype == torch.uint8 and qw.qdata.shape == (48, 128)
    assert qw.zero_point is not None
    floor = MIN_SQNR_DB["int4wo"] if group_size else MIN_SQNR_DB["int4wo"] - 3.0  # per-row is coarser
    assert sqnr_db(w, qw.dequantize()) >= floor


def test_int8dq_reference_equals_dequantized_math():
    w = torch.randn(40, 2048)  # K * 128 * 128 > 2**24: the float64 branch of int_group_dot
    x = torch.randn(6, 2048) * 2
    qw = config_for("int8dq").quantize_weight(w)
    assert isinstance(qw, Int8Tensor)
    qx, sx = quantize_per_token_sym(x, INT8_SYM)
    expect = (qx.double() * sx.double()) @ qw.dequantize().double().t()
    torch.testing.assert_close(F.linear(x, qw).double(), expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("key", ["fp8dq", "fp8dq_tensor"])
def test_fp8dq_reference_equals_dequantized_math(key):
    w = torch.randn(32, 128)
    x = torch.randn(5, 128)
    qw = config_for(key).quantize_weight(w)
    assert isinstance(qw, Float8Tensor) and qw.qdata.dtype == torch.float8_e4m3fn
    qt = qtype_by_name(qw.act_quant.qtype)
    if key == "fp8dq":
        qx, sx = quantize_per_token_sym(x, qt)
        assert qw.scale.shape == (32, 1)
    else:
        sx = x.abs().amax() / qt.qmax
        qx = (x / sx).to(qt.storage)
        assert qw.scale.numel() == 1
    expect = (qx.double() * sx.double()) @ qw.dequantize().double().t()
    torch.testing.assert_close(F.linear(x, qw).double(), expect, rtol=1e-5, atol=1e-4)


def test_bias_is_applied(format_name):
    lin = torch.nn.Linear(128, 32)
    lin.bias.data.fill_(5.0)  # large enough that a missing bias cannot pass
    x = torch.randn(4, 128)
    ref = lin(x)
    lowbit.quantize_(lin, config_for(format_name))
    with torch.no_grad():
        assert sqnr_db(ref, lin(x)) >= MIN_SQNR_DB[format_name]


def test_bad_activation_errors(format_name):
    qw = config_for(format_name).quantize_weight(torch.randn(32, 128))
    with pytest.raises(ValueError, match="activation last dim 64 != weight K 128"):
        F.linear(torch.randn(2, 64), qw)
    with pytest.raises(TypeError, match="floating-point activation"):
        F.linear(torch.ones(2, 128, dtype=torch.int32), qw)


def test_unsupported_op_names_the_op(format_name):
    qw = config_for(format_name).quantize_weight(torch.randn(32, 128))
    with pytest.raises(NotImplementedError, match="does not support aten"):
        torch.ops.aten.mul.Tensor(qw, 2.0)
