"""QAT's promise: the fake-quant model and the converted model compute the same outputs,
bit for bit (torch.equal), and convert installs exactly what PTQ would."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QATConfig
from lowbit.qat import FakeQuantizedLinear

BASE_CONFIGS = {
    "w4a8": lowbit.W4A8Config(group_size=32),
    "w4a8-asym-int": lowbit.W4A8Config(group_size=32, mapping="asymmetric", zero_point_domain="int"),
    "int4wo": lowbit.Int4WeightOnlyConfig(group_size=32),
    "int4wo-row-minmax": lowbit.Int4WeightOnlyConfig(group_size=None, scale_search="minmax"),
    "int8dq": lowbit.Int8DynamicActivationInt8WeightConfig(),
    "int8wo": lowbit.Int8WeightOnlyConfig(),
    "fp8dq-row": lowbit.Float8DynamicActivationFloat8WeightConfig(),
    "fp8dq-tensor": lowbit.Float8DynamicActivationFloat8WeightConfig(granularity="tensor"),
    "fp8wo": lowbit.Float8WeightOnlyConfig(),
}


def _random_case(seed: int) -> tuple[nn.Module, torch.Tensor]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k = rng.choice([32, 64, 96])
    n = rng.choice([32, 64])
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    model = nn.Sequential(nn.Linear(k, n, bias=rng.random() < 0.5), nn.GELU(), nn.Linear(n, 32)).to(dtype)
    lead = rng.choice([(1,), (7,), (33,), (2, 5)])
    x = (torch.randn(*lead, k) * rng.choice([0.1, 1.0, 20.0])).to(dtype)
    return model, x


@pytest.mark.parametrize("name", list(BASE_CONFIGS))
def test_prepare_output_equals_convert_output_over_100_seeds(name: str) -> None:
    cfg = BASE_CONFIGS[name]
    for seed in range(100):
        model, x = _random_case(seed)
        lowbit.quantize_(model, QATConfig(cfg, step="prepare"))
        assert isinstance(model[0], FakeQuantizedLinear)
        with torch.no_grad():
            fake = model(x)
        lowbit.quantize_(model, QATConfig(cfg, step="convert"))
        assert not isinstance(model[0], FakeQuantizedLinear)
        with torch.no_grad():
            served = model(x)
        assert served.dtype == fake.dtype
        assert torch.equal(fake, served), f"{name} seed {seed}: max diff {(fake - served).abs().max()}"


@pytest.mark.parametrize("name", ["w4a8", "int4wo", "int8dq", "fp8dq-row"])
def test_convert_installs_exactly_the_ptq_weight_of_the_trained_weights(name: str) -> None:
    cfg = BASE_CONFIGS[name]
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    lowbit.quantize_(model, QATConfig(cfg, step="prepare"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):  # the weights move, so convert must quantize the trained ones
        loss = model(torch.randn(8, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    lowbit.quantize_(model, QATConfig(cfg, step="convert"))
    for w, layer in zip(trained, (model[0], model[2])):
        ptq = cfg.quantize_weight(w)
        served = layer.weight
        assert type(served) is type(ptq)
        for a, b in zip(served.inner_tensors(), ptq.inner_tensors()):
            assert (a is None and b is None) or torch.equal(a, b)
        assert served.attributes() == ptq.attributes()
    assert model._lowbit_configs == {"0": cfg.to_dict(), "2": cfg.to_dict()}


def test_learnable_qparams_start_at_the_ptq_choice() -> None:
    for name, cfg in BASE_CONFIGS.items():
        model, x = _random_case(3)
        reference = [cfg.quantize_weight(model[i].weight.detach()) for i in (0, 2)]
        lowbit.quantize_(model, QATConfig(cfg, step="prepare", learnable_qparams=True))
        assert model[0].weight_scale is not None
        with torch.no_grad():
            fake = model(x)
        lowbit.quantize_(model, QATConfig(cfg, step="convert"))
        for ref, layer in zip(reference, (model[0], model[2])):
            for a, b in zip(layer.weight.inner_tensors(), ref.inner_tensors()):
                assert (a is None and b is None) or torch.equal(a, b), name
        with torch.no_grad():
            assert torch.equal(fake, model(x)), name
