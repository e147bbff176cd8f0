"""2:4 sparse formats as `lowbit.quantize_` configs.

    quantize_(model, SemiSparseConfig(prune=True))                          # 2:4 bf16/fp16 weights
    quantize_(model, Int8DynamicActivationSemiSparseInt8WeightConfig())     # W8A8 x 2:4, weights already 2:4

A weight that is already 2:4 (e.g. after `sparsify_(model, SemiSparsePruneConfig())` and
sparse fine-tuning) is taken as is. A dense weight is an error unless `prune=True`, which
applies 2:4 magnitude pruning first: pruning drops half the weights and should be a
decision, not a side effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.common import ActGranularity, ActQuant
from lowbit.formats.configs import QuantConfig, _check_threshold
from lowbit.sparsity import backends
from lowbit.sparsity.pattern import LAYOUT_K_MULTIPLE, not_24_message, prune_24


def _check_prune(cfg: SemiSparseConfig | Int8DynamicActivationSemiSparseInt8WeightConfig) -> None:
    prune = cfg.prune
    if not isinstance(prune, bool):
        raise ValueError(
            f"{type(cfg).__name__}.prune={prune!r} must be a bool (True: 2:4 magnitude-prune "
            "dense weights first; False: only take weights that are already 2:4)"
        )


def _shape_reason(kernel: KernelChoice, bits: int, n: int, k: int) -> str | None:
    """Shapes a 2:4 format takes: those its kernel choice can run (AUTO/TORCH: cuSPARSELt,
    CUTLASS: torch's CUTLASS kernels), and anything the stored layout holds for REFERENCE."""
    if kernel is KernelChoice.REFERENCE:
        return backends.shape_reason(n, k, (1, LAYOUT_K_MULTIPLE), "the 2:4 layout")
    if kernel is KernelChoice.CUTLASS:
        return backends.shape_reason(n, k, backends.CUTLASS_SHAPES[bits], "CUTLASS 2:4")
    return backends.shape_reason(n, k, backends.CUSPARSELT_SHAPES[bits], "cuSPARSELt 2:4")


def _pruned_or_raise(w: torch.Tensor, prune: bool) -> torch.Tensor:
    message = not_24_message(w)
    if message is None:
        return w
    if prune:
        return prune_24(w)
    raise ValueError(message)


@dataclass(frozen=True)
class SemiSparseConfig(QuantConfig):
    """2:4 sparse weights in their own dtype (fp16/bf16 on GPU; any float on the reference path),
    high-precision activations. Stored: half the values + 2-bit positions."""

    short_name: ClassVar[str] = "sparse24"
    prune: bool = False
    kernel: KernelChoice = KernelChoice.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prune(self)

    def unsupported_reason(self, n: int, k: int) -> str | None:
        return _shape_reason(self.kernel, 16, n, k)

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.sparsity.tensors import SemiSparseTensor

        if not w.is_floating_point():
            raise ValueError(f"SemiSparseConfig takes a floating-point weight, got {w.dtype}")
        return SemiSparseTensor.from_dense_24(_pruned_or_raise(w, self.prune), self.kernel)


@dataclass(frozen=True)
class Int8DynamicActivationSemiSparseInt8WeightConfig(QuantConfig):
    """W8A8 x 2:4: per-token symmetric int8 activations x 2:4 sparse per-row int8 weights.

    The numbers are exactly lowbit's dense int8dq (Int8DynamicActivationInt8WeightConfig) of
    the 2:4 weight; only the storage and the GPU kernel differ. `decode_threshold` as in int8dq.
    """

    short_name: ClassVar[str] = "int8dq_24"
    prune: bool = False
    decode_threshold: int = 0
    kernel: KernelChoice = KernelChoice.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_prune(self)
        _check_threshold(self)

    def unsupported_reason(self, n: int, k: int) -> str | None:
        return _shape_reason(self.kernel, 8, n, k)

    def act_quant(self) -> ActQuant:
        return ActQuant("int8_sym", ActGranularity.TOKEN, self.decode_threshold)

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.formats.int8 import Int8Tensor
        from lowbit.sparsity.tensors import SemiSparseInt8Tensor

        # Prune in high precision (magnitudes before rounding), then quantize exactly as int8dq:
        # rounding keeps zeros zero, so the int8 weight is 2:4 too.
        dense = Int8Tensor.from_hp(_pruned_or_raise(w, self.prune), self.act_quant(), self.kernel)
        return SemiSparseInt8Tensor.from_int8(dense)
