"""Prefill/decode format pairs, the phase switch in the generate loop, and the compiled decode step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, W4A8Config
from lowbit.core.tensor import QuantizedTensor
from lowbit.llm import (
    Generator,
    Phase,
    PhasedLinear,
    PrefillDecodeConfig,
    load_model,
    make_quantizer,
    quantize_phased_,
    use_phase,
)


def test_config_validation_and_round_trip():
    cfg = PrefillDecodeConfig(
        prefill=Int8DynamicActivationInt8WeightConfig(), decode=Int4WeightOnlyConfig(group_size=64)
    )
    assert PrefillDecodeConfig.from_dict(cfg.to_dict()) == cfg
    assert PrefillDecodeConfig.from_dict(PrefillDecodeConfig(decode=W4A8Config()).to_dict()).prefill is None
    with pytest.raises(ValueError, match="both None"):
        PrefillDecodeConfig()
    with pytest.raises(ValueError, match=r"PrefillDecodeConfig.decode='int4wo' is invalid"):
        PrefillDecodeConfig(decode="int4wo")
    assert "decode: K=100" in PrefillDecodeConfig(decode=Int4WeightOnlyConfig()).unsupported_reason(8, 100)


def test_phased_linear_reads_the_weight_of_its_phase():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(256, 64))  # second: K mismatch is fine
    model[2] = nn.Linear(64, 32)
    cfg = PrefillDecodeConfig(prefill=Int8DynamicActivationInt8WeightConfig(), decode=Int4WeightOnlyConfig())
    w = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match="kept 1 layer"):  # K=64 < group 128 for the decode format
        quantize_phased_(model, cfg)
    layer = model[0]
    assert isinstance(layer, PhasedLinear) and isinstance(model[2], nn.Linear)
    assert isinstance(layer.weight_prefill, QuantizedTensor) and isinstance(
        layer.weight_decode, QuantizedTensor
    )
    x = torch.randn(3, 256)
    want_p = F.linear(x, cfg.prefill.quantize_weight(w), layer.bias)
    want_d = F.linear(x, cfg.decode.quantize_weight(w), layer.bias)
    assert not torch.equal(want_p, want_d)
    assert torch.equal(layer(x), want_p)  # default phase: prefill
    with use_phase(model, Phase.DECODE):
        assert torch.equal(layer(x), want_d)
    assert layer.phase is Phase.PREFILL  # restored


def test_generate_runs_prompt_in_prefill_and_new_tokens_in_decode_phase():
    model = load_model("tiny", random_weights=True, quantizer=make_quantizer("int8dq", "w4a8"))
    seen: list[tuple[str, int]] = []
    layer = model.layers[0].feed_forward.w2
    assert isinstance(layer, PhasedLinear)
    layer.register_forward_hook(lambda m, args, out: seen.append((m.phase.value, args[0].shape[1])))
    model.setup_caches(2, 16)
    Generator(model).generate(torch.randint(0, 512, (2, 9)), 4)
    assert seen == [("prefill", 9), ("decode", 1), ("decode", 1), ("decode", 1)]


def test_compiled_decode_step_matches_eager():
    """torch.compile(fullgraph=True) of the decode step through PhasedLinear + W4A8/int8 tensors."""
    model = load_model("tiny", random_weights=True, quantizer=make_quantizer("int8dq", "w4a8"))
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    model.setup_caches(2, 16)
    eager = Generator(model).generate(ids, 6).tokens
    torch._dynamo.reset()
    gen = Generator(model, compile=True)
    gen.warmup(ids)
    compiled = gen.generate(ids, 6).tokens
    assert torch.equal(compiled, eager)


def test_group_size_zero_means_per_row():
    from lowbit.llm.loading import make_quantizer

    q = make_quantizer("w4a8", group_size=0)
    assert q.describe()["group_size"] is None
    assert make_quantizer("w4a8", group_size=64).describe()["group_size"] == 64
    assert make_quantizer("w4a8").describe()["group_size"] == 128
