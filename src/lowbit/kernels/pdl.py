"""Programmatic dependent launch (PDL, Hopper and later) for the decode kernels.

A decode step is a chain of short kernels. Launched with PDL, a kernel may start while the one
before it is still running: it issues the loads that do not depend on its predecessor (the
packed weights, which no kernel writes) and then blocks in `gdc_wait` until the predecessor has
finished and its writes are visible. Each lowbit decode kernel also calls
`gdc_launch_dependents` first thing, which lets the next PDL kernel start early.

Safety rules every kernel here follows: (1) before `gdc_wait` it only reads tensors that no
kernel writes (weights, scales) and writes nothing; (2) every program executes `gdc_wait`, so a
kernel completes only after its predecessor did (which makes the waits transitive along the
chain). Kernels that are not launched with PDL (Inductor's, cuBLAS) wait for full completion as
usual. LOWBIT_PDL=0 turns it off; it is never used under TRITON_INTERPRET or before sm_90.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL is off
    gdc_launch_dependents = gdc_wait = None

from lowbit.kernels import interpreter_enabled


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def enabled(x: torch.Tensor) -> bool:
    """True when kernels on x's device should be launched with PDL."""
    if not x.is_cuda or gdc_wait is None or interpreter_enabled():
        return False
    if os.environ.get("LOWBIT_PDL", "1") == "0":
        return False
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= 9


def launch(x: torch.Tensor, name: str) -> dict:
    """Extra launch arguments: USE_PDL / PDL_TRIGGER for the kernel and Triton's launch_pdl flag."""
    kernels = os.environ.get("LOWBIT_PDL_KERNELS", "all")
    if not enabled(x) or (kernels != "all" and name not in kernels.split(",")):
        return dict(USE_PDL=False, PDL_TRIGGER=False)
    trig = os.environ.get("LOWBIT_PDL_TRIGGER", "all")
    return dict(USE_PDL=True, PDL_TRIGGER=trig == "all" or name in trig.split(","), launch_pdl=True)


__all__ = ["enabled", "launch", "gdc_wait", "gdc_launch_dependents"]
