"""Which implementation runs a quantized op."""

from __future__ import annotations

import enum


class KernelChoice(str, enum.Enum):
    """AUTO picks by device, shape and token count; the others force one path.

    REFERENCE is the pure-PyTorch path that runs anywhere (CPU, CUDA, MPS) and
    is what tests compare every fast kernel against.
    """

    AUTO = "auto"
    TRITON = "triton"
    CUTLASS = "cutlass"
    TORCH = "torch"
    REFERENCE = "reference"
