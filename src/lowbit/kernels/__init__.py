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


def needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a linear call on x (+ bias) must record autograd (weights are frozen)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def dispatches_op(x: torch.Tensor, weight_data: torch.Tensor, grad: bool) -> bool:
    """Whether a kernel entry point must call its torch.library op rather than the implementation:
    while compiling, for autograd, and for fake / functional tensors (torch.compile's tracing must
    see the opaque op, never the kernels). Eager inference calls the implementation directly: the
    custom-op dispatcher adds tens of microseconds per call."""
    traced = type(x) is not torch.Tensor or type(weight_data) is not torch.Tensor
    return torch.compiler.is_compiling() or grad or traced


def triton_unavailable_reason(x: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on x's device, else why not."""
    if not _triton_installed():
        return "triton is not installed (pip install 'lowbit[triton]')"
    if x.is_cuda:
        return None
    if interpreter_enabled() and x.device.type == "cpu":
        return None
    return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {x.device}"
