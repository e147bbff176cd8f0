"""sparsify_: 2:4 magnitude pruning of a model's linear layers, optionally straight into a 2:4 format.

    report = sparsify_(model, SemiSparsePruneConfig())        # dense weights, half of them zero
    report = sparsify_(model, SemiSparseConfig())              # prune + store as 2:4 bf16/fp16
    report = sparsify_(model, Int8DynamicActivationSemiSparseInt8WeightConfig())   # prune + W8A8 2:4
    print(report)   # which layers were pruned, which were already 2:4, which were skipped and why
    report = sparsify_(model, Int8DynamicActivationSemiSparseInt8WeightConfig(), faster_at=2048)
    # ... only the layers the measured H100 table says run faster than dense int8dq at 2048 tokens

It also converts layers prepared for QAT (lowbit.QATConfig with the matching dense format,
e.g. int8dq for the int8 2:4 format) after sparse fine-tuning (see SemiSparseMasks): the
result computes exactly what the fake-quantized model computed.

All-or-nothing like quantize_: every new weight is built before the first one is swapped in.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.configs import Int8DynamicActivationInt8WeightConfig, QuantConfig
from lowbit.sparsity import backends, speed
from lowbit.sparsity.configs import Int8DynamicActivationSemiSparseInt8WeightConfig, SemiSparseConfig
from lowbit.sparsity.pattern import is_24, prune_24

FilterFn = Callable[[nn.Module, str], bool]
CONFIG_ATTR = "_lowbit_configs"


@dataclass(frozen=True)
class SemiSparsePruneConfig:
    """2:4 magnitude pruning that keeps weights dense (pruned weights become exact zeros):
    for evaluation, or before sparse fine-tuning and a later quantize_ with a 2:4 format.

    It takes the shapes every lowbit 2:4 format's default kernel takes (cuSPARSELt: N and K
    multiples of 32, the int8 minimum), so a pruned layer can always be converted later.
    """

    def unsupported_reason(self, n: int, k: int) -> str | None:
        return backends.shape_reason(n, k, backends.CUSPARSELT_SHAPES[8], "2:4 kernels (cuSPARSELt int8)")


SparsifyConfig = SemiSparsePruneConfig | SemiSparseConfig | Int8DynamicActivationSemiSparseInt8WeightConfig


@dataclass
class SparsifyReport:
    """What sparsify_ did, by layer name."""

    pruned: list[str] = field(default_factory=list)  # magnitude-pruned to 2:4
    already_sparse: list[str] = field(default_factory=list)  # already 2:4: kept as is
    skipped: list[str] = field(default_factory=list)  # "name (reason)"
    # With a format config: from which token count the 2:4 kernel beats the dense format on the
    # layer's shape, per the measured table (lowbit.sparsity.speed; None: never in the measured range).
    faster_from: dict[str, int | None] = field(default_factory=dict)

    @property
    def sparsified(self) -> list[str]:
        return self.pruned + self.already_sparse

    def __str__(self) -> str:
        lines = [
            f"2:4: {len(self.pruned)} layer(s) pruned, {len(self.already_sparse)} already 2:4, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  pruned   {n}{self._speed(n)}" for n in self.pruned]
        lines += [f"  as is    {n}{self._speed(n)}" for n in self.already_sparse]
        lines += [f"  skipped  {s}" for s in self.skipped]
        return "\n".join(lines)

    def _speed(self, name: str) -> str:
        if name not in self.faster_from:
            return ""
        m = self.faster_from[name]
        return "  (2:4 slower than dense at every measured M)" if m is None else f"  (2:4 faster from M={m})"


def _qat_layer() -> type:
    from lowbit.qat import FakeQuantizedLinear  # lazily: lowbit.qat imports the format configs

    return FakeQuantizedLinear


def _dense_counterpart(config: QuantConfig) -> Int8DynamicActivationInt8WeightConfig | None:
    """The dense format whose QAT-prepared layers this 2:4 format converts exactly."""
    if isinstance(config, Int8DynamicActivationSemiSparseInt8WeightConfig):
        return Int8DynamicActivationInt8WeightConfig(decode_threshold=config.decode_threshold)
    return None


def _converted_qat(m: Any, config: Int8DynamicActivationSemiSparseInt8WeightConfig) -> QuantizedTensor:
    """The 2:4 weight of a QAT layer: its (pruned) weight under the qparams it trained with."""
    from lowbit.qat.fake_quant import quantized_weight
    from lowbit.sparsity.tensors import SemiSparseInt8Tensor

    with torch.no_grad():
        scale = None if m.weight_scale is None else m.weight_scale.detach()
        zero = None if m.weight_zero_point is None else m.weight_zero_point.detach()
        q = quantized_weight(m.base_config, m.qspec, prune_24(m.weight.detach()), scale, zero)
    return SemiSparseInt8Tensor.from_int8(q, kernel=config.kernel)


def _new_layer(module: nn.Linear, weight: QuantizedTensor) -> nn.Linear:
    new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.bias = module.bias
    new.train(module.training)
    return new


def _table_fmt(config: QuantConfig) -> str:
    return "int8dq" if isinstance(config, Int8DynamicActivationSemiSparseInt8WeightConfig) else "bf16"


def _slower_reason(config: QuantConfig, n: int, k: int, faster_at: int) -> str | None:
    """Why the measured table says this layer would run slower as 2:4 than dense (None: it won't)."""
    est = speed.speedup_vs_dense(n, k, faster_at, _table_fmt(config))
    if est.pays():
        return None
    if est.speedup is None and est.note:
        return f"2:4 {est.fmt} at M={faster_at}: {est.note}"
    shown = "unknown" if est.speedup is None else f"{est.speedup:.2f}x"
    where = "" if est.measured else ", shape not measured: worst measured shape"
    return f"2:4 {est.fmt} is {shown} dense at M={faster_at} on {est.device}{where}"


def sparsify_(
    model: nn.Module,
    config: SparsifyConfig,
    filter_fn: FilterFn | None = None,
    on_unsupported: str = "skip",
    faster_at: int | None = None,
) -> SparsifyReport:
    """2:4-prune (and with a format config, convert) every nn.Linear that `filter_fn(module, fqn)`
    accepts. Layers whose shape the config cannot take are skipped and listed (one warning), or
    with on_unsupported="error" raise before anything changes. Returns a SparsifyReport.

    `faster_at=M` (format configs only): also skip, and list, the layers that the measured speed
    table (lowbit.sparsity.speed) says run slower as 2:4 than as the dense format at M tokens per
    call; not an error with on_unsupported="error" (nothing is wrong with them)."""
    if not isinstance(
        config, (SemiSparsePruneConfig, SemiSparseConfig, Int8DynamicActivationSemiSparseInt8WeightConfig)
    ):
        raise TypeError(
            "sparsify_ takes SemiSparsePruneConfig, SemiSparseConfig or "
            f"Int8DynamicActivationSemiSparseInt8WeightConfig, got {type(config).__name__}"
        )
    if on_unsupported not in ("skip", "error"):
        raise ValueError(f"on_unsupported={on_unsupported!r}; allowed: ['skip', 'error']")
    if faster_at is not None and (
        not isinstance(config, QuantConfig)
        or isinstance(faster_at, bool)
        or not isinstance(faster_at, int)
        or faster_at < 1
    ):
        raise ValueError(
            f"faster_at={faster_at!r} must be a token count >= 1 with a 2:4 format config (SemiSparseConfig "
            f"or Int8DynamicActivationSemiSparseInt8WeightConfig), got {type(config).__name__}"
        )
    accept = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear))
    qat_cls = _qat_layer()
    fmt = config if isinstance(config, QuantConfig) else None
    report = SparsifyReport()
    targets: list[tuple[str, nn.Linear]] = []
    slower: list[str] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not accept(module, fqn):
            continue
        if isinstance(module.weight, QuantizedTensor):
            raise ValueError(
                f"layer {fqn!r} is already quantized ({type(module.weight).__name__}); "
                "sparsify a high-precision model"
            )
        is_qat = isinstance(module, qat_cls)
        reason = config.unsupported_reason(*module.weight.shape)
        if reason is None and is_qat:
            reason = _qat_reason(module, fmt)
        if reason is not None:
            report.skipped.append(f"{fqn} ({reason})")
            continue
        n, k = module.weight.shape
        slow = None if fmt is None or faster_at is None else _slower_reason(fmt, n, k, faster_at)
        if slow is not None:
            slower.append(f"{fqn} ({slow})")
        else:
            targets.append((fqn, module))
    if report.skipped and on_unsupported == "error":
        raise ValueError(
            f"{type(config).__name__} cannot take {len(report.skipped)} layer(s): "
            + "; ".join(report.skipped)
        )
    report.skipped += slower
    if fmt is not None and any(fqn == "" for fqn, _ in targets):
        raise ValueError(
            "sparsify_ with a 2:4 format needs a model that contains the nn.Linear layers, "
            "not a bare nn.Linear (wrap it, e.g. in nn.Sequential)"
        )
    prepared: list[tuple[str, nn.Linear, torch.Tensor | QuantizedTensor]] = []
    for fqn, module in targets:
        w = module.weight.detach()
        (report.already_sparse if is_24(w) else report.pruned).append(fqn)
        if fmt is not None:
            report.faster_from[fqn] = speed.crossover_tokens(w.shape[0], w.shape[1], _table_fmt(fmt))
        try:
            if fmt is None:
                new: torch.Tensor | QuantizedTensor = prune_24(w)
            elif isinstance(module, qat_cls):
                new = _converted_qat(module, fmt)  # type: ignore[arg-type]
            else:
                new = dataclasses.replace(fmt, prune=True).quantize_weight(w)
        except Exception as e:
            raise RuntimeError(f"sparsifying layer {fqn!r} failed (model unchanged): {e}") from e
        prepared.append((fqn, module, new))
    for fqn, module, new in prepared:
        if isinstance(new, QuantizedTensor):
            model.set_submodule(fqn, _new_layer(module, new))
        else:
            with torch.no_grad():
                module.weight.copy_(new)
    if fmt is not None and prepared:
        record = dict(getattr(model, CONFIG_ATTR, {}))
        for fqn, _, _ in prepared:
            record[fqn] = fmt.to_dict()
        setattr(model, CONFIG_ATTR, record)
    if report.skipped:
        warnings.warn(
            f"sparsify_: skipped {len(report.skipped)} layer(s): " + "; ".join(report.skipped),
            UserWarning,
            stacklevel=2,
        )
    return report


def _qat_reason(module: Any, fmt: QuantConfig | None) -> str | None:
    """Why a QAT-prepared layer cannot be converted to this 2:4 config (None: it can)."""
    if fmt is None:  # pruning a prepared layer's weight in place is fine
        return None
    want, base = _dense_counterpart(fmt), module.base_config
    if want is None or type(base) is not type(want) or base.decode_threshold != want.decode_threshold:
        return (
            f"prepared for QAT with {type(base).__name__}, which {type(fmt).__name__} does not "
            f"reproduce (it converts {'nothing' if want is None else repr(want)})"
        )
    return None
