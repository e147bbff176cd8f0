"""sparsify_ (pruning report, conversion, all-or-nothing) and fixed-mask sparse fine-tuning,
alone and under QAT, converted exactly to the served 2:4 int8 model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import (
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationSemiSparseInt8WeightConfig,
    QATConfig,
    SemiSparseConfig,
    sparsify_,
)
from lowbit.core.tensor import QuantizedTensor
from lowbit.sparsity import (
    SemiSparseInt8Tensor,
    SemiSparseMasks,
    SemiSparsePruneConfig,
    SemiSparseTensor,
    is_24,
    prune_24,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.odd = nn.Linear(64, 24)  # N=24: no 2:4 kernel takes it
        self.head = nn.Linear(24, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.odd(self.down(F.gelu(self.up(x)))))


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_prune_report_lists_pruned_as_is_and_skipped_layers():
    model = Net()
    with torch.no_grad():
        model.down.weight.copy_(prune_24(model.down.weight))
    down_before = model.down.weight.detach().clone()
    up_param = model.up.weight
    with pytest.warns(UserWarning, match=r"skipped 2 layer\(s\): odd \(.*N=24, K=64\); head"):
        report = sparsify_(model, SemiSparsePruneConfig())
    assert report.pruned == ["up"] and report.already_sparse == ["down"]
    assert [s.split(" ")[0] for s in report.skipped] == ["odd", "head"]
    assert "1 layer(s) pruned, 1 already 2:4, 2 skipped" in str(report)
    assert model.up.weight is up_param and is_24(model.up.weight)  # pruned in place, still dense
    assert torch.equal(model.down.weight, down_before)
    assert not is_24(model.odd.weight)


@pytest.mark.parametrize("cls", [SemiSparseConfig, Int8DynamicActivationSemiSparseInt8WeightConfig])
def test_sparsify_with_a_format_prunes_and_converts(cls):
    model = Net()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="skipped 2"):
        report = sparsify_(model, cls())
    assert report.pruned == ["up", "down"]
    want_cls = SemiSparseTensor if cls is SemiSparseConfig else SemiSparseInt8Tensor
    assert isinstance(model.up.weight, want_cls) and isinstance(model.down.weight, want_cls)
    assert type(model.odd.weight) is nn.Parameter
    assert set(model._lowbit_configs) == {"up", "down"}
    # Same numbers as pruning first, then quantize_ with the format (which takes 2:4 weights as is).
    sparsify_(reference, SemiSparsePruneConfig(), filter_fn=lambda m, n: n in ("up", "down"))
    lowbit.quantize_(reference, cls(), filter_fn=lambda m, n: n in ("up", "down"))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_errors_leave_the_model_unchanged():
    model = Net()
    snap = _state(model)
    with pytest.raises(ValueError, match=r"cannot take 2 layer\(s\): odd"):
        sparsify_(model, SemiSparseConfig(), on_unsupported="error")
    with pytest.raises(TypeError, match="sparsify_ takes SemiSparsePruneConfig"):
        sparsify_(model, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(ValueError, match="on_unsupported='never'"):
        sparsify_(model, SemiSparseConfig(), on_unsupported="never")
    lowbit.quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, n: n == "head")
    with pytest.raises(ValueError, match="'head' is already quantized"):
        sparsify_(model, SemiSparsePruneConfig())
    state = model.state_dict()
    for k, v in snap.items():
        if not k.startswith("head."):
            assert torch.equal(state[k], v), k


def test_masks_fix_the_pattern_and_mask_gradients():
    model = Net()
    masks = SemiSparseMasks.attach(model)
    assert masks.layers == ["up", "down"] and len(masks.skipped) == 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pattern = {n: model.get_submodule(n).weight.detach() != 0 for n in masks.layers}
    for _ in range(3):
        loss = model(torch.randn(8, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        for name in masks.layers:
            p = model.get_submodule(name).weight
            assert not p.grad[~pattern[name]].any()  # no gradient reaches pruned weights
        opt.step()
        masks.reapply()
        masks.check()
    for name in masks.layers:
        w = model.get_submodule(name).weight
        assert is_24(w) and not ((w != 0) & ~pattern[name]).any()
    with torch.no_grad():
        model.up.weight.add_(1.0)
    with pytest.raises(AssertionError, match="up: .* pruned weights are non-zero"):
        masks.check()
    masks.remove()


@pytest.mark.parametrize("masks_first", [True, False])
def test_sparse_qat_converts_exactly_to_the_int8_2_4_model(masks_first):
    """Masks + QAT(int8dq) training, then sparsify_ -> outputs bit-identical to the fake-quant model."""
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    qat = QATConfig(Int8DynamicActivationInt8WeightConfig(), "prepare")
    if masks_first:
        masks = SemiSparseMasks.attach(model)
        lowbit.quantize_(model, qat)
    else:
        lowbit.quantize_(model, qat)
        masks = SemiSparseMasks.attach(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(torch.randn(16, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.reapply()
    masks.check()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        fake_quant = model(x)
    report = sparsify_(model, Int8DynamicActivationSemiSparseInt8WeightConfig())
    assert report.already_sparse == ["0", "2"] and not report.pruned
    assert all(isinstance(model[i].weight, SemiSparseInt8Tensor) for i in (0, 2))
    assert type(model[0]) is nn.Linear and not isinstance(model[0].bias, QuantizedTensor)
    with torch.no_grad():
        assert torch.equal(model(x), fake_quant)


def test_qat_layers_of_another_format_are_skipped_with_the_reason():
    model = nn.Sequential(nn.Linear(64, 128))
    lowbit.quantize_(model, QATConfig(lowbit.W4A8Config(group_size=64), "prepare"))
    with pytest.warns(UserWarning, match="prepared for QAT with Int8DynamicActivationInt4WeightConfig"):
        report = sparsify_(model, Int8DynamicActivationSemiSparseInt8WeightConfig())
    assert report.skipped and not report.sparsified
