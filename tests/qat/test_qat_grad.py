"""Straight-through gradients, learnable quantization parameters, torch.compile and autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QATConfig
from lowbit.core.qtype import ZeroPointDomain
from lowbit.qat.fake_quant import FakeQuantizedLinear, fake_quant_activation
from lowbit.qat.qparams import expand_blocks, weight_qtype

CONFIGS = {
    "w4a8": lowbit.W4A8Config(group_size=32),
    "int4wo-float": lowbit.Int4WeightOnlyConfig(group_size=32),
    "int4wo-int": lowbit.Int4WeightOnlyConfig(group_size=32, zero_point_domain="int"),
    "int8dq": lowbit.Int8DynamicActivationInt8WeightConfig(),
    "int8wo": lowbit.Int8WeightOnlyConfig(),
    "fp8dq": lowbit.Float8DynamicActivationFloat8WeightConfig(),
}


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _surrogate(layer: FakeQuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """The fake-quant linear written with autograd-visible ops: round() passed straight
    through, clamp() blocking the gradient of clamped elements (LSQ for scale / zero)."""
    q = layer.quantized_weight()
    qtype, block = weight_qtype(q), tuple(q.block_size)
    domain = getattr(q, "zero_point_domain", ZeroPointDomain.NONE)
    s = expand_blocks(layer.weight_scale, block)
    w = layer.weight
    if qtype.is_float:
        v = (w / s).clamp(qtype.qmin, qtype.qmax)
        w_hat = (v + (v.to(q.qdata.dtype).float() - v).detach()) * s
    elif domain is ZeroPointDomain.FLOAT:
        z = expand_blocks(layer.weight_zero_point, block)
        w_hat = _round_ste((w - z) / s).clamp(qtype.qmin, qtype.qmax) * s + z
    elif domain is ZeroPointDomain.INT:
        zp = _round_ste(expand_blocks(layer.weight_zero_point, block))
        w_hat = ((_round_ste(w / s) + zp).clamp(qtype.qmin, qtype.qmax) - zp) * s
    else:
        w_hat = _round_ste(w / s).clamp(qtype.qmin, qtype.qmax) * s
    x2 = x.reshape(-1, x.shape[-1])
    x_hat = x2 + (fake_quant_activation(q, layer.qspec.act_quant, x2.detach()) - x2).detach()
    return torch.nn.functional.linear(x_hat, w_hat, layer.bias).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_are_the_straight_through_estimator(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    lowbit.quantize_(model, QATConfig(CONFIGS[name], learnable_qparams=True))
    layer = model[0]
    with torch.no_grad():  # move the scales off the min/max choice so some weights clamp
        layer.weight_scale.mul_(0.8)
    x = torch.randn(3, 5, 64, requires_grad=True)
    target = torch.randn(3, 5, 32)
    params = [
        p for p in (x, layer.weight, layer.bias, layer.weight_scale, layer.weight_zero_point) if p is not None
    ]
    out = layer(x)
    grads = torch.autograd.grad((out - target).square().sum(), params)
    ref_out = _surrogate(layer, x)
    ref_grads = torch.autograd.grad((ref_out - target).square().sum(), params)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    clamped = 0
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and g.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
        clamped += int((g == 0).sum())
    assert clamped > 0  # the clipping mask was exercised


def test_weight_gradient_without_range_learning_is_masked_ste() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    cfg = lowbit.Int4WeightOnlyConfig(group_size=32)
    lowbit.quantize_(model, QATConfig(cfg))
    x = torch.randn(7, 64)
    g = torch.randn(7, 32)
    model(x).backward(g)
    q = model[0].quantized_weight()
    # MSE scale search clips some weights: they get no gradient, the others g^T x.
    expected = g.t() @ x
    got = model[0].weight.grad
    inside = got != 0
    assert 0 < int((~inside).sum()) < inside.numel() // 2
    torch.testing.assert_close(got[inside], expected[inside])
    assert q.dequantize().shape == got.shape


def test_compile_fullgraph_matches_eager_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    lowbit.quantize_(model, QATConfig(lowbit.W4A8Config(group_size=32), learnable_qparams=True))
    x = torch.randn(9, 64)
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["w4a8", "int4wo-float", "fp8dq"])
def test_autocast_trains_and_converts_to_the_same_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    lowbit.quantize_(model, QATConfig(CONFIGS[name]))
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = model(x)
    fake.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    lowbit.quantize_(model, QATConfig(CONFIGS[name], step="convert"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        served = model(x)
    assert served.dtype == fake.dtype
    assert torch.equal(fake.detach(), served)


@pytest.mark.parametrize("name", ["w4a8", "int4wo-float", "int4wo-int"])
def test_range_learning_trains_and_convert_still_matches(name: str) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
    student = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
    student.load_state_dict(teacher.state_dict())
    cfg = CONFIGS[name]
    lowbit.quantize_(student, QATConfig(cfg, learnable_qparams=True))
    # Only the quantization parameters train: any loss decrease is range learning's.
    qparams = [p for n, p in student.named_parameters() if "weight_scale" in n or "weight_zero_point" in n]
    assert len(qparams) == (2 if name == "w4a8" else 4)
    for n, p in student.named_parameters():
        p.requires_grad_(n.endswith(("weight_scale", "weight_zero_point")))
    with torch.no_grad():  # start from too coarse a grid, so there is something to learn
        for layer in (student[0], student[2]):
            layer.weight_scale.mul_(1.5)
    start = [p.detach().clone() for p in qparams]
    opt = torch.optim.Adam(qparams, lr=1e-3)
    x = torch.randn(256, 64)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(60):
        loss = (student(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, qparams))
    with torch.no_grad():
        fake = student(x)
    lowbit.quantize_(student, QATConfig(cfg, step="convert"))
    with torch.no_grad():
        assert torch.equal(fake, student(x))
    assert not torch.equal(student[0].weight.scale.float(), start[0])  # convert used the learned scale
