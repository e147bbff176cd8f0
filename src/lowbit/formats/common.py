"""Pieces shared by the formats: the activation-quantization descriptor, kernel
selection helpers and the exact integer reference GEMMs."""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch

from lowbit.core.kernel_choice import KernelChoice


class ActGranularity(str, enum.Enum):
    TOKEN = "token"
    TENSOR = "tensor"


@dataclass(frozen=True)
class ActQuant:
    """How a weight expects its activations to be quantized at run time.

    A plain dataclass (never a callable) so it pickles under weights_only and
    serializes to JSON.  `decode_threshold`: when the token count (product of
    all leading dims of x) is below it, the weight-read path runs instead and
    activations stay in high precision.
    """

    qtype: str = "int8_sym"
    granularity: ActGranularity = ActGranularity.TOKEN
    decode_threshold: int = 0

    def to_dict(self) -> dict:
        return {"qtype": self.qtype, "granularity": self.granularity.value,
                "decode_threshold": self.decode_threshold}

    @classmethod
    def from_dict(cls, d: dict) -> "ActQuant":
        return cls(d["qtype"], ActGranularity(d["granularity"]), int(d["decode_threshold"]))


def token_count(x: torch.Tensor) -> int:
    """Tokens of an activation = product of its leading dims (2-D and 3-D alike)."""
    n = 1
    for s in x.shape[:-1]:
        n *= s
    return n


def uses_act_quant(act: ActQuant | None, x: torch.Tensor) -> bool:
    return act is not None and token_count(x) >= act.decode_threshold


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_activation(x: torch.Tensor, k: int, fmt: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{fmt} linear expects a floating-point activation, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{fmt} linear: activation last dim {x.shape[-1]} != weight K {k}")


def resolve_kernel(choice: KernelChoice, x: torch.Tensor, available: dict[KernelChoice, str | None],
                   fmt: str) -> KernelChoice:
    """The one place a format turns its KernelChoice into a path.

    `available` maps each fast choice to None (usable here) or the reason it is not.
    AUTO on a CPU/MPS tensor is the reference; AUTO on CUDA takes the first usable
    fast path and warns once (naming why) if none is usable.
    """
    if choice is KernelChoice.REFERENCE:
        return choice
    if choice is not KernelChoice.AUTO:
        reason = available.get(choice, f"{fmt} has no {choice.value} kernel")
        if reason is not None:
            raise RuntimeError(f"kernel={choice.value!r} requested for {fmt} but unavailable: {reason}")
        return choice
    if not x.is_cuda:
        return KernelChoice.REFERENCE
    for c, reason in available.items():
        if reason is None:
            return c
    reasons = "; ".join(f"{c.value}: {r}" for c, r in available.items()) or "no fast kernel"
    warn_once(f"{fmt}-{reasons}", f"{fmt}: running the pure-PyTorch reference on CUDA ({reasons})")
    return KernelChoice.REFERENCE


def int_group_dot(qx: torch.Tensor, qw: torch.Tensor, group: int, w_absmax: int) -> torch.Tensor:
    """Exact integer dot products per K-group: (M, K) x (N, K) -> (G, M, N) float.

    Every partial sum is an integer; float32 represents them exactly while
    K_group * 128 * w_absmax < 2**24 (a static bound: no data-dependent branch, so
    torch.compile traces it), otherwise float64 is used. So the result
    equals an int32 accumulation bit for bit, in any summation order.
    """
    m, k = qx.shape
    n = qw.shape[0]
    g = k // group
    bound = group * 128 * w_absmax
    ftype = torch.float32 if bound < 2**24 else torch.float64
    a = qx.to(ftype).reshape(m, g, group).permute(1, 0, 2)
    b = qw.to(ftype).reshape(n, g, group).permute(1, 2, 0)
    return torch.bmm(a, b)
