"""Prefill-aware execution with an explicit pair of formats.

Prefill is compute bound (thousands of tokens per GEMM): int8/float8 tensor cores with
dynamic activation quantization win there. Decode is weight-read bound (one token per
sequence): the fewest weight bytes win. Dynamic lowbit configs already pick a path from one
stored weight by token count (`decode_threshold`); `PrefillDecodeConfig` goes further and
stores two quantized copies of every linear, e.g. int8 W8A8 for prefill and int4 weight-only
for decode, at the memory cost of both copies.

    cfg = PrefillDecodeConfig(prefill=Int8DynamicActivationInt8WeightConfig(),
                              decode=Int4WeightOnlyConfig())
    quantize_phased_(model, cfg)
    with use_phase(model, Phase.DECODE):
        ...  # every PhasedLinear reads its decode weight

The generate loop sets the phase itself (prefill for the prompt, decode for the new tokens).
"""

from __future__ import annotations

import contextlib
import enum
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.configs import QuantConfig


class Phase(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class PrefillDecodeConfig:
    """One format for prefill, another for decode; None keeps that phase in high precision."""

    prefill: QuantConfig | None = None
    decode: QuantConfig | None = None

    def __post_init__(self) -> None:
        for name in ("prefill", "decode"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, QuantConfig):
                raise ValueError(
                    f"PrefillDecodeConfig.{name}={v!r} is invalid; allowed: a lowbit "
                    "QuantConfig (e.g. Int4WeightOnlyConfig()) or None (high precision)"
                )
        if self.prefill is None and self.decode is None:
            raise ValueError(
                "PrefillDecodeConfig: prefill and decode are both None; allowed: at least one QuantConfig"
            )

    def unsupported_reason(self, n: int, k: int) -> str | None:
        for name in ("prefill", "decode"):
            cfg = getattr(self, name)
            reason = cfg.unsupported_reason(n, k) if cfg is not None else None
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "prefill": None if self.prefill is None else self.prefill.to_dict(),
            "decode": None if self.decode is None else self.decode.to_dict(),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "PrefillDecodeConfig":
        def one(x: dict | None) -> QuantConfig | None:
            return None if x is None else QuantConfig.from_dict(x)

        return PrefillDecodeConfig(prefill=one(d.get("prefill")), decode=one(d.get("decode")))


class PhasedLinear(nn.Module):
    """A linear layer holding one weight per phase; `phase` picks the one F.linear reads.

    When both phases use the same format the weight is stored once.
    """

    def __init__(
        self, weight_prefill: torch.Tensor, weight_decode: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_prefill.shape[1], weight_prefill.shape[0]
        self.weight_prefill = nn.Parameter(weight_prefill, requires_grad=False)
        if weight_decode is weight_prefill:
            self.weight_decode = self.weight_prefill
        else:
            self.weight_decode = nn.Parameter(weight_decode, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.phase = Phase.PREFILL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_decode if self.phase is Phase.DECODE else self.weight_prefill
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        def fmt(w: torch.Tensor) -> str:
            return type(w).__name__ if isinstance(w, QuantizedTensor) else str(w.dtype)

        return (
            f"in={self.in_features}, out={self.out_features}, prefill={fmt(self.weight_prefill)}, "
            f"decode={fmt(self.weight_decode)}, phase={self.phase.value}"
        )


def _quantize_or_keep(cfg: QuantConfig | None, w: torch.Tensor) -> torch.Tensor:
    return w if cfg is None else cfg.quantize_weight(w)


def quantize_phased_(
    model: nn.Module, config: PrefillDecodeConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> nn.Module:
    """Replace every accepted nn.Linear (not the root) by a PhasedLinear; all-or-nothing.

    Layers a format cannot take stay nn.Linear (one warning lists them).
    """
    if not isinstance(config, PrefillDecodeConfig):
        raise TypeError(f"config must be a PrefillDecodeConfig, got {type(config).__name__}")
    accept = filter_fn or (lambda m, fqn: True)
    plans: list[tuple[str, PhasedLinear]] = []
    skipped: list[str] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not fqn or not accept(module, fqn):
            continue
        if isinstance(module.weight, QuantizedTensor):
            raise ValueError(f"layer {fqn!r} is already quantized; quantize a high-precision model")
        reason = config.unsupported_reason(*module.weight.shape)
        if reason is not None:
            skipped.append(f"{fqn} ({reason})")
            continue
        w = module.weight.detach()
        try:
            wp = _quantize_or_keep(config.prefill, w)
            wd = wp if config.decode == config.prefill else _quantize_or_keep(config.decode, w)
        except Exception as e:
            raise RuntimeError(f"quantizing layer {fqn!r} failed (model unchanged): {e}") from e
        plans.append((fqn, PhasedLinear(wp, wd, module.bias)))
    for fqn, new in plans:
        model.set_submodule(fqn, new)
    if skipped:
        warnings.warn(
            f"PrefillDecodeConfig: kept {len(skipped)} layer(s) in high precision: " + "; ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return model


def set_phase(model: nn.Module, phase: Phase | str) -> None:
    p = Phase(phase)
    for m in model.modules():
        if isinstance(m, PhasedLinear):
            m.phase = p


@contextlib.contextmanager
def use_phase(model: nn.Module, phase: Phase | str) -> Iterator[None]:
    """Within the block every PhasedLinear of `model` runs `phase`; restored afterwards."""
    layers = [m for m in model.modules() if isinstance(m, PhasedLinear)]
    before = [m.phase for m in layers]
    p = Phase(phase)
    for m in layers:
        m.phase = p
    try:
        yield
    finally:
        for m, old in zip(layers, before):
            m.phase = old
