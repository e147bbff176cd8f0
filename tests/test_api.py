"""quantize_: what it quantizes, all-or-nothing failures, skip/error policies, progress, import hygiene."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lowbit import Int4WeightOnlyConfig, Int8WeightOnlyConfig, W4A8Config, quantize_
from lowbit.api import PROGRESS_MIN_LAYERS
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.int4 import Int4Tensor
from lowbit.testing import sqnr_db


class Block(nn.Module):
    def __init__(self, k_odd: int | None = None) -> None:
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128, bias=False)
        self.norm = nn.LayerNorm(128)
        self.odd = nn.Linear(k_odd, 64) if k_odd else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x))))


def _model(k_odd: int | None = None) -> nn.Module:
    return nn.Sequential(Block(k_odd), Block(), nn.Linear(128, 32))


def _snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(p) for k, p in model.named_parameters()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    return state, ids, grads


def _assert_unchanged(model: nn.Module, snap: tuple[dict, dict, dict]) -> None:
    state, ids, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert type(now[k]) is torch.Tensor and torch.equal(now[k], v), k
    assert {k: id(p) for k, p in model.named_parameters()} == ids
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert not hasattr(model, "_lowbit_configs")


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_quantizes_every_linear_and_records_configs():
    model = _model()
    x = torch.randn(3, 128)
    ref = model(x)
    cfg = W4A8Config()
    assert quantize_(model, cfg) is model
    lins = _linears(model)
    assert all(isinstance(m.weight, QuantizedTensor) and not m.weight.requires_grad for m in lins.values())
    assert model._lowbit_configs == {n: cfg.to_dict() for n in lins}
    assert isinstance(model[0].norm.weight, nn.Parameter) and type(model[0].norm.weight.data) is torch.Tensor
    with torch.no_grad():
        assert sqnr_db(ref, model(x)) > 10


def test_filter_fn_selects_layers_by_fqn():
    model = _model()
    seen: list[str] = []

    def only_up(module: nn.Module, fqn: str) -> bool:
        seen.append(fqn)
        return fqn.endswith("up")

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=only_up)
    assert {"0.up", "0.down", "1.up", "1.down", "2"} <= set(seen)
    quantized = {n for n, m in _linears(model).items() if isinstance(m.weight, QuantizedTensor)}
    assert quantized == {"0.up", "1.up"}
    assert set(model._lowbit_configs) == {"0.up", "1.up"}
    # A second pass over other layers adds to the record.
    quantize_(model, Int4WeightOnlyConfig(), filter_fn=lambda m, n: n == "2")
    assert set(model._lowbit_configs) == {"0.up", "1.up", "2"}
    assert isinstance(model[2].weight, Int4Tensor)


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    model = _model()
    snap = _snapshot(model)
    original = Int4Tensor.from_hp.__func__
    calls: list[tuple] = []

    def flaky(cls, w, *args, **kwargs):
        calls.append(tuple(w.shape))
        if len(calls) == 3:  # two layers already converted when this one fails
            raise RuntimeError("simulated failure")
        return original(cls, w, *args, **kwargs)

    monkeypatch.setattr(Int4Tensor, "from_hp", classmethod(flaky))
    with pytest.raises(RuntimeError, match=r"quantizing layer '1\.up' failed \(model unchanged\)"):
        quantize_(model, W4A8Config())
    assert len(calls) == 3
    _assert_unchanged(model, snap)


def test_filter_that_raises_leaves_model_unchanged():
    model = _model()
    snap = _snapshot(model)

    def bad_filter(module: nn.Module, fqn: str) -> bool:
        if fqn == "1.down":
            raise KeyError("filter bug")
        return True

    with pytest.raises(KeyError, match="filter bug"):
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=bad_filter)
    _assert_unchanged(model, snap)


def test_on_unsupported_error_leaves_model_unchanged():
    model = _model(k_odd=33)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot take 1 layer\(s\): 0\.odd \(K=33 is odd"):
        quantize_(model, Int4WeightOnlyConfig(group_size=None), on_unsupported="error")
    _assert_unchanged(model, snap)


def test_skip_warns_once_listing_every_skipped_layer():
    model = _model(k_odd=33)
    model.extra = nn.Linear(96, 8)  # 96 % 128 != 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(model, W4A8Config(group_size=128))
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "skipped 2 layer(s)" in msgs[0] and "0.odd" in msgs[0] and "extra" in msgs[0]
    assert "K=33 is odd" in msgs[0] and "group_size=128" in msgs[0]
    assert type(model[0].odd.weight.data) is torch.Tensor and type(model.extra.weight.data) is torch.Tensor
    assert isinstance(model[0].up.weight, Int4Tensor)
    assert "0.odd" not in model._lowbit_configs and "0.up" in model._lowbit_configs


def test_no_warning_when_nothing_is_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(_model(), W4A8Config())


def test_already_quantized_raises_and_changes_nothing():
    model = quantize_(_model(), Int8WeightOnlyConfig(), filter_fn=lambda m, n: n == "1.up")
    before = {k: id(p) for k, p in model.named_parameters()}
    record = dict(model._lowbit_configs)
    with pytest.raises(ValueError, match=r"layer '1\.up' is already quantized \(Int8Tensor\)"):
        quantize_(model, W4A8Config())
    assert {k: id(p) for k, p in model.named_parameters()} == before
    assert model._lowbit_configs == record
    assert type(model[0].up.weight.data) is torch.Tensor


def test_bad_arguments():
    model = _model()
    with pytest.raises(TypeError, match="config must be a lowbit config"):
        quantize_(model, "w4a8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"on_unsupported='ignore'; allowed: \['skip', 'error'\]"):
        quantize_(model, W4A8Config(), on_unsupported="ignore")
    assert not hasattr(model, "_lowbit_configs")


def _deep(n_layers: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(128, 128) for _ in range(n_layers)])


def test_progress_bar_does_not_break(capsys):
    model = _deep(PROGRESS_MIN_LAYERS + 2)
    x = torch.randn(2, 128)
    ref = model(x)
    quantize_(model, Int8WeightOnlyConfig())
    assert all(isinstance(m.weight, QuantizedTensor) for m in model)
    with torch.no_grad():
        assert sqnr_db(ref, model(x)) > 25
    out = capsys.readouterr()
    assert "Traceback" not in out.err


def test_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were missing
    model = quantize_(_deep(PROGRESS_MIN_LAYERS), Int8WeightOnlyConfig())
    assert all(isinstance(m.weight, QuantizedTensor) for m in model)


def test_device_argument_moves_weight_and_bias():
    model = quantize_(_model(), W4A8Config(), device="cpu")
    assert model[2].weight.device.type == "cpu" and model[2].bias.device.type == "cpu"
    assert model[2].bias.requires_grad


def test_import_does_not_import_triton_or_initialise_cuda():
    code = (
        "import sys, lowbit, torch\n"
        "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)\n"
        "assert not torch.cuda.is_initialized()\n"
        "m = torch.nn.Sequential(torch.nn.Linear(128, 64))\n"
        "lowbit.quantize_(m, lowbit.W4A8Config())\n"
        "m(torch.randn(2, 128))\n"
        "assert 'triton' not in sys.modules, 'a CPU forward imported triton'\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"
