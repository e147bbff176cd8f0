"""QATConfig through quantize_: validation, clear errors that change nothing, filters, policies."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QATConfig
from lowbit.qat import FakeQuantizedLinear


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model: nn.Module, snap) -> None:
    modules, state = _snapshot(model)
    assert modules == snap[0]
    assert state.keys() == snap[1].keys()
    assert all(torch.equal(state[k], snap[1][k]) for k in state)


def test_config_validation_names_field_value_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"QATConfig.step='train'.*allowed: \['prepare', 'convert'\]"):
        QATConfig(lowbit.W4A8Config(), step="train")
    with pytest.raises(ValueError, match="QATConfig.base_config=.*allowed: .*Int4WeightOnlyConfig"):
        QATConfig("w4a8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learnable_qparams=1 must be a bool"):
        QATConfig(lowbit.W4A8Config(), learnable_qparams=1)  # type: ignore[arg-type]
    cfg = QATConfig(lowbit.Int4WeightOnlyConfig(group_size=32), "convert", True)
    assert cfg.step.value == "convert"
    assert QATConfig.from_dict(cfg.to_dict()) == cfg


def test_convert_without_prepare_is_a_clear_error_and_changes_nothing() -> None:
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="no layer prepared for QAT"):
        lowbit.quantize_(model, QATConfig(lowbit.W4A8Config(group_size=32), step="convert"))
    _assert_unchanged(model, snap)


def test_convert_with_another_base_config_is_a_clear_error_and_changes_nothing() -> None:
    model = _model()
    lowbit.quantize_(model, QATConfig(lowbit.W4A8Config(group_size=32)))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="was prepared with .*group_size=32.* but convert was given"):
        lowbit.quantize_(model, QATConfig(lowbit.W4A8Config(group_size=64), step="convert"))
    with pytest.raises(ValueError, match="convert with the config used at prepare"):
        lowbit.quantize_(model, QATConfig(lowbit.Int8WeightOnlyConfig(), step="convert"))
    _assert_unchanged(model, snap)


def test_prepare_twice_is_a_clear_error_and_changes_nothing() -> None:
    model = _model()
    lowbit.quantize_(model, QATConfig(lowbit.Int8DynamicActivationInt8WeightConfig()))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already prepared for QAT"):
        lowbit.quantize_(model, QATConfig(lowbit.Int8DynamicActivationInt8WeightConfig()))
    _assert_unchanged(model, snap)


def test_prepare_of_a_quantized_model_is_refused() -> None:
    model = _model()
    lowbit.quantize_(model, lowbit.Int8WeightOnlyConfig())
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.quantize_(model, QATConfig(lowbit.Int8WeightOnlyConfig()))


def test_unsupported_layers_follow_on_unsupported() -> None:
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))  # K=48: no g32 groups
    snap = _snapshot(model)
    cfg = QATConfig(lowbit.Int4WeightOnlyConfig(group_size=32))
    with pytest.raises(ValueError, match=r"cannot take 1 layer\(s\): 2 \(K=48"):
        lowbit.quantize_(model, cfg, on_unsupported="error")
    _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="on_unsupported='maybe'"):
        lowbit.quantize_(model, cfg, on_unsupported="maybe")
    with pytest.warns(UserWarning, match="skipped 1 layer"):
        lowbit.quantize_(model, cfg)
    assert isinstance(model[0], FakeQuantizedLinear) and type(model[2]) is nn.Linear
    lowbit.quantize_(model, QATConfig(lowbit.Int4WeightOnlyConfig(group_size=32), step="convert"))
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert list(model._lowbit_configs) == ["0"]


def test_filter_fn_and_shared_parameters() -> None:
    model = _model()
    weight = model[2].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before prepare
    lowbit.quantize_(
        model,
        QATConfig(lowbit.W4A8Config(group_size=32)),
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn == "2",
    )
    assert type(model[0]) is nn.Linear and isinstance(model[2], FakeQuantizedLinear)
    assert model[2].weight is weight  # the optimizer still trains the layer
    before = weight.detach().clone()
    model(torch.randn(4, 64)).square().sum().backward()
    opt.step()
    assert not torch.equal(before, weight.detach())
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_bare_linear_is_refused_with_a_hint() -> None:
    layer = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="wrap it"):
        lowbit.quantize_(layer, QATConfig(lowbit.Int8WeightOnlyConfig()))


def test_converted_model_saves_and_loads_weights_only() -> None:
    cfg = lowbit.W4A8Config(group_size=32)
    model = _model()
    lowbit.quantize_(model, QATConfig(cfg, learnable_qparams=True))
    lowbit.quantize_(model, QATConfig(cfg, step="convert"))
    x = torch.randn(3, 64)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    lowbit.quantize_(fresh, cfg)
    fresh.load_state_dict(torch.load(buf, weights_only=True), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
