"""decode_threshold: below T tokens (product of leading dims) the weight-read path runs,
at or above T the dynamic activation-quantization path; 2-D and 3-D inputs agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.formats.configs import config_from_short_name

DYNAMIC_FORMATS = ["int8dq", "w4a8", "fp8dq"]
T = 6
SHAPES = [(1,), (1, 1), (5,), (1, 5), (5, 1), (6,), (2, 3), (3, 2), (2, 4), (13,)]


def _weights(name: str, threshold: int):
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    gated = config_from_short_name(name, decode_threshold=threshold, kernel="reference").quantize_weight(w)
    always = config_from_short_name(name, decode_threshold=0, kernel="reference").quantize_weight(w)
    return gated, always


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
@pytest.mark.parametrize("lead", SHAPES, ids=str)
def test_path_follows_token_count(name, lead):
    gated, always = _weights(name, T)
    assert torch.equal(gated.qdata, always.qdata)  # one stored weight; only the path differs
    x = torch.randn(*lead, 256)
    out = F.linear(x, gated)
    act_quant = F.linear(x, always)
    weight_read = F.linear(x, gated.dequantize(x.dtype))
    # The two candidate results must be distinguishable for this test to mean anything.
    assert float((act_quant - weight_read).abs().max()) > 1e-3
    tokens = 1
    for s in lead:
        tokens *= s
    expect = weight_read if tokens < T else act_quant
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
    assert out.shape == (*lead, 64)


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
@pytest.mark.parametrize("tokens,split", [(1, (1, 1)), (4, (2, 2)), (6, (2, 3)), (12, (3, 4))])
def test_2d_and_3d_inputs_give_identical_outputs(name, tokens, split):
    gated, _ = _weights(name, T)
    x2 = torch.randn(tokens, 256)
    y2 = F.linear(x2, gated)
    y3 = F.linear(x2.reshape(*split, 256), gated)
    assert torch.equal(y3.reshape(tokens, 64), y2)


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
def test_threshold_zero_always_quantizes_activations(name):
    _, always = _weights(name, 0)
    assert always.act_quant.decode_threshold == 0
    x = torch.randn(1, 1, 256)
    weight_read = F.linear(x, always.dequantize())
    assert float((F.linear(x, always) - weight_read).abs().max()) > 1e-3


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
def test_threshold_is_carried_by_the_weight(name):
    gated, _ = _weights(name, 17)
    assert gated.act_quant is not None and gated.act_quant.decode_threshold == 17
    assert "decode_threshold" in config_from_short_name(name, decode_threshold=17).to_dict()


@pytest.mark.parametrize("name", DYNAMIC_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_decode_path(name, dtype):
    torch.manual_seed(2)
    w = torch.randn(64, 256).to(dtype)
    gated = config_from_short_name(name, decode_threshold=4).quantize_weight(w)
    x = torch.randn(1, 3, 256).to(dtype)
    out = F.linear(x, gated)
    assert out.dtype == dtype
    torch.testing.assert_close(out, F.linear(x, gated.dequantize(dtype)), rtol=0, atol=0)
