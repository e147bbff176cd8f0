"""torch.compile(fullgraph=True) sees through every quantized linear and matches eager."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.configs import CONFIGS_BY_SHORT_NAME, config_from_short_name

DYNAMIC_FORMATS = {"int8dq", "w4a8", "fp8dq"}


def _model() -> torch.nn.Module:
    # K = 128 for both layers so the default int4 group size (128) quantizes every layer.
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))


@pytest.mark.parametrize("name", sorted(CONFIGS_BY_SHORT_NAME))
def test_compile_fullgraph_matches_eager(name):
    torch._dynamo.reset()
    kwargs = {"decode_threshold": 4} if name in DYNAMIC_FORMATS else {}
    model = lowbit.quantize_(_model(), config_from_short_name(name, **kwargs))
    assert all(isinstance(m.weight, QuantizedTensor) for m in model if isinstance(m, torch.nn.Linear))
    compiled = torch.compile(model, fullgraph=True)
    # 2 x 3 = 6 tokens: with decode_threshold=4 this is the activation-quantization path.
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        eager = model(x)
        got = compiled(x)
    assert got.shape == eager.shape == (2, 3, 32)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_compile_decode_path_matches_eager():
    torch._dynamo.reset()
    model = lowbit.quantize_(_model(), lowbit.W4A8Config(decode_threshold=4))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, 128)  # 1 token < 4: the weight-read path
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
