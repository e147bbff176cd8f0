"""Fast kernels. Nothing here imports triton or touches CUDA at import time."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(x: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on x's device, else why not."""
    if not _triton_installed():
        return "triton is not installed (pip install 'lowbit[triton]')"
    if x.is_cuda:
        return None
    if interpreter_enabled() and x.device.type == "cpu":
        return None
    return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {x.device}"
