"""QATConfig: quantization-aware training through `lowbit.quantize_`.

    lowbit.quantize_(model, QATConfig(W4A8Config(), step="prepare"))   # fake-quant layers
    ... train ...
    lowbit.quantize_(model, QATConfig(W4A8Config(), step="convert"))   # real quantized weights

Both steps are all-or-nothing like `quantize_`: every check and every new layer is
done before the first layer is swapped, so an error leaves the model as it was.
"""

from __future__ import annotations

import copy
import enum
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.configs import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from lowbit.qat.fake_quant import FakeQuantizedLinear

FilterFn = Callable[[nn.Module, str], bool]
CONFIG_ATTR = "_lowbit_configs"  # the record quantize_ keeps (serialization reads it)

QAT_BASE_CONFIGS: tuple[type[QuantConfig], ...] = (
    Int8DynamicActivationInt4WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
)


class QATStep(str, enum.Enum):
    PREPARE = "prepare"  # swap nn.Linear for FakeQuantizedLinear
    CONVERT = "convert"  # swap FakeQuantizedLinear for nn.Linear with a quantized weight


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training for `base_config`.

    `learnable_qparams` (range learning) makes each layer's weight scale and zero point
    trainable Parameters, initialised to the post-training choice; it is read at prepare
    (convert installs what each layer learned).
    """

    base_config: QuantConfig
    step: QATStep = QATStep.PREPARE
    learnable_qparams: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.base_config, QAT_BASE_CONFIGS):
            raise ValueError(
                f"QATConfig.base_config={self.base_config!r} is not supported; allowed: "
                f"{[c.__name__ for c in QAT_BASE_CONFIGS]}"
            )
        try:
            object.__setattr__(self, "step", QATStep(self.step))
        except ValueError:
            raise ValueError(
                f"QATConfig.step={self.step!r} is invalid; allowed: {[s.value for s in QATStep]}"
            ) from None
        if not isinstance(self.learnable_qparams, bool):
            raise ValueError(f"QATConfig.learnable_qparams={self.learnable_qparams!r} must be a bool")

    def to_dict(self) -> dict:
        return {
            "type": type(self).__name__,
            "base_config": self.base_config.to_dict(),
            "step": self.step.value,
            "learnable_qparams": self.learnable_qparams,
        }

    @staticmethod
    def from_dict(d: dict) -> "QATConfig":
        return QATConfig(
            QuantConfig.from_dict(d["base_config"]),
            d.get("step", "prepare"),
            bool(d.get("learnable_qparams", False)),
        )

    def apply_to_model(
        self,
        model: nn.Module,
        filter_fn: FilterFn | None = None,
        device: torch.device | str | None = None,
        on_unsupported: Any = "skip",
    ) -> nn.Module:
        """What `quantize_(model, self, ...)` does. Returns `model`."""
        from lowbit.api import OnUnsupported

        try:
            policy = OnUnsupported(on_unsupported)
        except ValueError:
            raise ValueError(
                f"on_unsupported={on_unsupported!r}; allowed: {[p.value for p in OnUnsupported]}"
            ) from None
        accept = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear))
        if self.step is QATStep.PREPARE:
            return _prepare(model, self, accept, device, policy is OnUnsupported.ERROR)
        return _convert(model, self, accept, device)


def _prepare(model: nn.Module, cfg: QATConfig, accept: FilterFn, device: Any, strict: bool) -> nn.Module:
    name = type(cfg.base_config).__name__
    targets: list[tuple[str, nn.Linear]] = []
    unsupported: list[str] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not accept(module, fqn):
            continue
        if fqn == "":
            raise ValueError(
                "quantize_ with QATConfig needs a model that contains the nn.Linear layers, "
                "not a bare nn.Linear (wrap it, e.g. in nn.Sequential)"
            )
        if isinstance(module, FakeQuantizedLinear):
            raise ValueError(
                f"layer {fqn!r} is already prepared for QAT "
                f"({type(module.base_config).__name__}); prepare a model once, then convert"
            )
        if isinstance(module.weight, QuantizedTensor):
            raise ValueError(
                f"layer {fqn!r} is already quantized ({type(module.weight).__name__}); "
                "QAT prepares a high-precision model"
            )
        reason = cfg.base_config.unsupported_reason(*module.weight.shape)
        if reason is not None:
            unsupported.append(f"{fqn} ({reason})")
        else:
            targets.append((fqn, module))
    if unsupported and strict:
        raise ValueError(f"{name} cannot take {len(unsupported)} layer(s): " + "; ".join(unsupported))
    new_layers: list[tuple[str, FakeQuantizedLinear]] = []
    for fqn, module in targets:
        try:
            new = FakeQuantizedLinear.from_linear(module, cfg.base_config, cfg.learnable_qparams)
            if device is not None:
                new = new.to(device)
        except Exception as e:
            raise RuntimeError(f"preparing layer {fqn!r} for QAT failed (model unchanged): {e}") from e
        new_layers.append((fqn, new))
    for fqn, new in new_layers:
        model.set_submodule(fqn, new)
    if unsupported:
        warnings.warn(
            f"QAT {name}: skipped {len(unsupported)} layer(s) it cannot take: " + "; ".join(unsupported),
            UserWarning,
            stacklevel=4,
        )
    return model


def _convert(model: nn.Module, cfg: QATConfig, accept: FilterFn, device: Any) -> nn.Module:
    targets = [
        (fqn, m) for fqn, m in model.named_modules() if isinstance(m, FakeQuantizedLinear) and accept(m, fqn)
    ]
    if not targets:
        raise ValueError(
            "convert found no layer prepared for QAT; run quantize_(model, "
            "QATConfig(base_config, step='prepare')) and train first"
        )
    for fqn, m in targets:
        if m.base_config != cfg.base_config:
            raise ValueError(
                f"layer {fqn!r} was prepared with {m.base_config!r} but convert was given "
                f"{cfg.base_config!r}; convert with the config used at prepare"
            )
    new_layers: list[tuple[str, nn.Linear]] = []
    for fqn, m in targets:
        try:
            new_layers.append((fqn, _converted(m, device)))
        except Exception as e:
            raise RuntimeError(f"converting layer {fqn!r} failed (model unchanged): {e}") from e
    for fqn, new in new_layers:
        model.set_submodule(fqn, new)
    record = dict(getattr(model, CONFIG_ATTR, {}))
    for fqn, _ in targets:
        record[fqn] = cfg.base_config.to_dict()
    setattr(model, CONFIG_ATTR, record)
    return model


def _converted(m: FakeQuantizedLinear, device: Any) -> nn.Linear:
    """A plain nn.Linear holding the quantized weight the fake-quant forward used; like
    quantize_, it keeps the layer's bias Parameter (a copy only when moving devices)."""
    if device is not None:
        m = copy.deepcopy(m).to(device)  # the prepared layer itself stays untouched
    q = m.quantized_weight()
    new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    new.weight = nn.Parameter(q, requires_grad=False)
    new.bias = m.bias
    new.train(m.training)
    return new
