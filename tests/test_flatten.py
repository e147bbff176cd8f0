"""flatten_quantized_linears: plain-buffer linears compute exactly what subclass-weight linears do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit

CONFIGS = {"w4a8": lowbit.W4A8Config(group_size=32), "int8dq": lowbit.Int8DynamicActivationInt8WeightConfig(),
           "int4wo": lowbit.Int4WeightOnlyConfig(group_size=32)}


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_flat_linears_match_eager_and_compiled(cfg) -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64, bias=False))
    lowbit.quantize_(ref, cfg)
    flat = nn.Sequential(*[m for m in ref])  # same modules, then swapped in place
    x = torch.randn(5, 128)
    with torch.no_grad():
        want = ref(x)
        assert lowbit.flatten_quantized_linears(flat) == 2
        assert isinstance(flat[0], lowbit.FlatQuantizedLinear)
        assert not any(isinstance(b, lowbit.core.tensor.QuantizedTensor) for b in flat.buffers())
        assert torch.equal(flat(x), want)
        assert type(flat[0].weight) is type(ref[0].weight)  # the property rebuilds the subclass
        compiled = torch.compile(flat, fullgraph=True)
        assert torch.allclose(compiled(x), want, rtol=1e-5, atol=1e-5)
    assert lowbit.flatten_quantized_linears(flat) == 0  # idempotent: nothing left to swap


def test_flat_linear_refuses_a_dense_weight() -> None:
    with pytest.raises(TypeError, match="quantized weight"):
        lowbit.FlatQuantizedLinear(nn.Linear(4, 4))
