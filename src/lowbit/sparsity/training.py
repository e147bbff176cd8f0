"""Sparse fine-tuning with fixed 2:4 masks.

    masks = SemiSparseMasks.attach(model)            # 2:4 magnitude masks, pruned weights zeroed
    quantize_(model, QATConfig(Int8DynamicActivationInt8WeightConfig()))   # optional: QAT on top
    for batch in data:
        loss(model(batch)).backward()
        opt.step(); opt.zero_grad()
        masks.reapply()                              # pruned weights back to exact zeros
    masks.remove()
    sparsify_(model, Int8DynamicActivationSemiSparseInt8WeightConfig())   # the served 2:4 model

The mask is chosen once (magnitude, at attach) and then fixed. A gradient hook on each
masked Parameter zeroes the gradient of pruned weights, so the optimizer only trains the kept
ones; `reapply` after each step re-zeroes pruned weights that decoupled weight decay or
momentum could otherwise move. The hooks live on the Parameters, so they keep working when
QAT prepare later wraps the layers (FakeQuantizedLinear shares its Parameters).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.sparsity.api import SemiSparsePruneConfig
from lowbit.sparsity.pattern import mask_24

FilterFn = Callable[[nn.Module, str], bool]


class SemiSparseMasks:
    """Fixed 2:4 masks on a model's linear weights (see the module docstring)."""

    def __init__(self, masks: dict[str, tuple[torch.Tensor, torch.Tensor]], skipped: list[str]) -> None:
        self.masks = masks
        self.skipped = skipped
        self._handles = [p.register_hook(_masking_hook(m)) for p, m in masks.values()]

    @classmethod
    def attach(cls, model: nn.Module, filter_fn: FilterFn | None = None) -> "SemiSparseMasks":
        """Choose 2:4 magnitude masks for every accepted nn.Linear, zero the pruned weights,
        and mask their gradients from now on. Shapes no 2:4 kernel takes are skipped (listed
        in `.skipped`)."""
        accept = filter_fn or (lambda m, fqn: isinstance(m, nn.Linear))
        rule = SemiSparsePruneConfig()
        masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        skipped: list[str] = []
        for fqn, module in model.named_modules():
            if not isinstance(module, nn.Linear) or not accept(module, fqn):
                continue
            w = module.weight
            if isinstance(w, QuantizedTensor) or not w.is_floating_point():
                raise ValueError(
                    f"layer {fqn!r} has a quantized weight; attach masks to a "
                    "high-precision (or QAT-prepared) model"
                )
            reason = rule.unsupported_reason(*w.shape)
            if reason is not None:
                skipped.append(f"{fqn} ({reason})")
                continue
            masks[fqn] = (w, mask_24(w.detach()))
        out = cls(masks, skipped)
        out.reapply()
        return out

    @property
    def layers(self) -> list[str]:
        return list(self.masks)

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero every pruned weight (call after each optimizer step)."""
        for p, m in self.masks.values():
            p.masked_fill_(~m, 0)

    def check(self) -> None:
        """Raise if a masked weight has a non-zero where its mask prunes (a forgotten reapply)."""
        for fqn, (p, m) in self.masks.items():
            leaked = int((p.detach()[~m] != 0).sum())
            if leaked:
                raise AssertionError(
                    f"{fqn}: {leaked} pruned weights are non-zero; call reapply() after each optimizer step"
                )

    def remove(self) -> None:
        """Drop the gradient hooks (weights keep their zeros)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _masking_hook(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(~mask, 0)

    return hook
