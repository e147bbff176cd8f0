"""Saving and loading quantized models: bit-exact round trips, safe loading, clean failures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8WeightOnlyConfig,
    KernelChoice,
    LoadError,
    load_quantized,
    quantize_,
    save_quantized,
)
from lowbit.core.tensor import QuantizedTensor
from lowbit.serialization import CONFIG_FILE, WEIGHTS_FILE
from lowbit.testing import MIN_SQNR_DB, config_for

FORMATS = sorted(MIN_SQNR_DB) + ["int4wo_int_zp"]


def _config(name: str):
    if name == "int4wo_int_zp":  # int8 zero points + a ZeroPointDomain attribute to round-trip
        return Int4WeightOnlyConfig(group_size=64, zero_point_domain="int", scale_search="minmax")
    return config_for(name)


class Net(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.inp = nn.Linear(128, hidden)
        self.mid = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 32)
        self.register_buffer("offset", torch.zeros(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.mid(self.inp(x))))) + self.offset


def _quantized(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(seed)
    model = Net().to(dtype)
    model.offset.normal_()
    return quantize_(model, _config(name))


def _fresh(seed: int = 123) -> Net:
    torch.manual_seed(seed)
    return Net()


def _snapshot(model: nn.Module) -> dict:
    return {
        "ids": {k: id(p) for k, p in model.named_parameters()},
        "types": {k: type(v) for k, v in model.state_dict().items()},
        "plain": {k: v.clone() for k, v in model.state_dict().items() if not isinstance(v, QuantizedTensor)},
        "configs": getattr(model, "_lowbit_configs", None),
    }


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    assert {k: id(p) for k, p in model.named_parameters()} == snap["ids"]
    state = model.state_dict()
    assert {k: type(v) for k, v in state.items()} == snap["types"]
    for k, v in snap["plain"].items():
        assert torch.equal(state[k], v), k
    assert getattr(model, "_lowbit_configs", None) == snap["configs"]


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(7)).to(dtype)


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert type(sa[k]) is type(sb[k]), k
        if isinstance(sa[k], QuantizedTensor):
            assert sa[k].attributes() == sb[k].attributes(), k
            for ta, tb in zip(sa[k].inner_tensors(), sb[k].inner_tensors()):
                assert (ta is None and tb is None) or (ta.dtype == tb.dtype and torch.equal(ta, tb)), k
        else:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", FORMATS)
def test_torch_save_weights_only_round_trip(name):
    model = _quantized(name)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _fresh()
    fresh.load_state_dict(state, assign=True)
    _same_weights(model, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(_x()), model(_x()))


@pytest.mark.parametrize("name", FORMATS)
def test_save_load_quantized_round_trip(name, tmp_path):
    model = _quantized(name)
    save_quantized(model, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    loaded = load_quantized(_fresh(), tmp_path)
    _same_weights(model, loaded)
    assert loaded._lowbit_configs == model._lowbit_configs
    assert all(not p.requires_grad for p in loaded.parameters() if isinstance(p, QuantizedTensor))
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_model_round_trip(dtype, tmp_path):
    model = _quantized("w4a8", dtype=dtype)
    save_quantized(model, tmp_path)
    loaded = load_quantized(lambda: Net().to(dtype), tmp_path)  # a factory works too
    _same_weights(model, loaded)
    assert loaded.mid.weight.dtype == dtype
    with torch.no_grad():
        assert torch.equal(loaded(_x(dtype)), model(_x(dtype)))


def test_decode_threshold_and_kernel_survive(tmp_path):
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=64, decode_threshold=9, kernel="reference")
    model = quantize_(_fresh(1), cfg)
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["configs"]["mid"]["decode_threshold"] == 9
    loaded = load_quantized(_fresh(), tmp_path)
    for layer in (loaded.inp, loaded.mid, loaded.out):
        w = layer.weight
        assert w.act_quant.decode_threshold == 9 and w.kernel is KernelChoice.REFERENCE
        assert w.group_size == 64
    # The restored threshold still selects the path: 8 tokens read weights, 10 quantize activations.
    for tokens in (8, 10):
        x = torch.randn(tokens, 128)
        with torch.no_grad():
            assert torch.equal(loaded.inp(x), model.inp(x))
    assert {type(v) for v in [loaded._lowbit_configs["mid"]["kernel"]]} == {str}
    assert loaded._lowbit_configs["mid"]["kernel"] == "reference"


def test_torch_load_keeps_threshold_and_kernel():
    cfg = Int8DynamicActivationInt4WeightConfig(decode_threshold=5, kernel="reference")
    model = quantize_(_fresh(1), cfg)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["mid.weight"].act_quant.decode_threshold == 5
    assert state["mid.weight"].kernel is KernelChoice.REFERENCE


def test_load_into_already_quantized_model(tmp_path):
    model = _quantized("w4a8", seed=0)
    save_quantized(model, tmp_path)
    target = _quantized("w4a8", seed=5)  # same config, different weights
    with torch.no_grad():
        assert not torch.equal(target(_x()), model(_x()))
    loaded = load_quantized(target, tmp_path)
    assert loaded is target
    _same_weights(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


def test_load_state_dict_copy_into_quantized_model():
    model = _quantized("int8dq", seed=0)
    target = _quantized("int8dq", seed=3)
    ids = {k: id(p) for k, p in target.named_parameters()}
    target.load_state_dict(model.state_dict())  # in-place copy_ into matching quantized weights
    assert {k: id(p) for k, p in target.named_parameters()} == ids
    with torch.no_grad():
        assert torch.equal(target(_x()), model(_x()))


def _saved(tmp_path: Path) -> Path:
    save_quantized(_quantized("w4a8"), tmp_path)
    return tmp_path


@pytest.mark.parametrize("target_kind", ["fresh", "quantized"])
@pytest.mark.parametrize(
    "damage",
    [
        "garbage_weights",
        "truncated_weights",
        "truncated_json",
        "no_json",
        "no_weights",
        "old_version",
        "missing_inner_tensor",
        "unknown_class",
    ],
)
def test_bad_checkpoint_raises_load_error_and_leaves_model(damage, target_kind, tmp_path):
    d = _saved(tmp_path)
    wpath, cpath = d / WEIGHTS_FILE, d / CONFIG_FILE
    if damage == "garbage_weights":
        wpath.write_bytes(b"\x00\x13not a safetensors file" * 64)
    elif damage == "truncated_weights":
        wpath.write_bytes(wpath.read_bytes()[: wpath.stat().st_size // 2])
    elif damage == "truncated_json":
        cpath.write_text(cpath.read_text()[:-40])
    elif damage == "no_json":
        cpath.unlink()
    elif damage == "no_weights":
        wpath.unlink()
    else:
        meta = json.loads(cpath.read_text())
        if damage == "old_version":
            meta["lowbit_format_version"] = 0
        elif damage == "missing_inner_tensor":  # w4a8 is symmetric: no zero_point was saved
            meta["tensors"]["mid.weight"]["tensors"] = ["qdata", "scale", "zero_point"]
        else:
            meta["tensors"]["mid.weight"]["class"] = "Int3Tensor"
        cpath.write_text(json.dumps(meta))
    target = _fresh() if target_kind == "fresh" else _quantized("w4a8", seed=9)
    snap = _snapshot(target)
    with torch.no_grad():
        before = target(_x())
    with pytest.raises(LoadError):
        load_quantized(target, d)
    _assert_unchanged(target, snap)
    with torch.no_grad():
        assert torch.equal(target(_x()), before)


@pytest.mark.parametrize("other", [{"group_size": 64}, {"group_size": 32}, {"decode_threshold": 3}])
def test_weights_file_from_another_config(other, tmp_path):
    # The JSON describes group 128; a weights file written for another config must not load
    # silently (the group-64 scales would broadcast into wrong numbers), unless it really fits.
    d = _saved(tmp_path / "a")
    save_quantized(quantize_(_fresh(), Int8DynamicActivationInt4WeightConfig(**other)), tmp_path / "b")
    (d / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    target = _fresh()
    if "group_size" in other:
        snap = _snapshot(target)
        with pytest.raises(LoadError, match=r"scale: stored shape"):
            load_quantized(target, d)
        _assert_unchanged(target, snap)
    else:  # same tensor layout: loads, and the JSON's attributes win
        assert load_quantized(target, d).mid.weight.act_quant.decode_threshold == 0


@pytest.mark.parametrize("arch", ["wider", "renamed", "extra_layer"])
def test_different_architecture_raises_load_error_and_leaves_model(arch, tmp_path):
    d = _saved(tmp_path)
    if arch == "wider":
        target: nn.Module = Net(hidden=256)
    elif arch == "renamed":
        target = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 32))
    else:
        target = _fresh()
        target.extra = nn.Linear(32, 32)
    snap = _snapshot(target)
    with pytest.raises(LoadError, match="shape|does not match"):
        load_quantized(target, d)
    _assert_unchanged(target, snap)


def test_missing_directory_raises_load_error(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_quantized(_fresh(), tmp_path / "nowhere")


def test_weights_only_load_rejects_arbitrary_globals():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(buf, weights_only=True)


def test_partially_quantized_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = quantize_(Net(), Int8WeightOnlyConfig(), filter_fn=lambda m, n: n == "mid")
    save_quantized(model, tmp_path)
    loaded = load_quantized(_fresh(), tmp_path)
    assert isinstance(loaded.mid.weight, QuantizedTensor) and type(loaded.inp.weight.data) is torch.Tensor
    assert loaded._lowbit_configs == {"mid": Int8WeightOnlyConfig().to_dict()}
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))
