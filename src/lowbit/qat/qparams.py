"""Quantized weights from explicit quantization parameters, and the straight-through terms.

Post-training quantization chooses a weight's scale (and zero point) itself
(`QuantConfig.quantize_weight`). Range learning makes them trainable, so the
fake-quant forward and `convert` need to build the *same* quantized tensor from
given (scale, zero) instead. `QSpec.build` does that with the primitives of
`lowbit.core.primitives` and the storage rules of each format's `from_hp`; with
the parameters PTQ chose it returns a tensor equal to `quantize_weight`'s
(tests check this bit for bit).

`ste_terms` gives what every backward needs: the dequantized weight, the mask of
weights inside the representable range (clipped straight-through estimator) and
the per-element derivative of the dequantized weight with respect to its scale
(the LSQ rule, with round() passed straight through).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowbit.core.packing import pack_int4
from lowbit.core.primitives import quantize
from lowbit.core.qtype import INT4, INT8, QType, ZeroPointDomain, qtype_by_name
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.float8 import Float8Tensor
from lowbit.formats.int4 import Int4Tensor
from lowbit.formats.int8 import Int8Tensor

_SUPPORTED = (Int4Tensor, Int8Tensor, Float8Tensor)


def _float8_qtype(dtype: torch.dtype) -> QType:
    return qtype_by_name(str(dtype).removeprefix("torch."))


def weight_qtype(q: Any) -> QType:
    """The element type a quantized weight stores."""
    if isinstance(q, Int4Tensor):
        return INT4
    if isinstance(q, Int8Tensor):
        return INT8
    if isinstance(q, Float8Tensor):
        qdata: Any = q.inner_tensors()[0]
        return _float8_qtype(qdata.dtype)
    raise TypeError(
        f"QAT does not know the weight format {type(q).__name__}; allowed: {[c.__name__ for c in _SUPPORTED]}"
    )


def zero_point_domain(q: QuantizedTensor) -> ZeroPointDomain:
    return getattr(q, "zero_point_domain", ZeroPointDomain.NONE)


@dataclass(frozen=True)
class QSpec:
    """Everything but the numbers of a quantized weight: its class, element type and
    plain attributes (block size, activation quantization, kernel choice, ...).
    Hashable, so torch.compile treats it as a constant."""

    cls: type
    qtype_name: str
    attrs: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, q: QuantizedTensor) -> "QSpec":
        return cls(type(q), weight_qtype(q).name, tuple(q.attributes().items()))

    @property
    def attributes(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def act_quant(self) -> Any:
        return self.attributes.get("act_quant")

    def build(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> QuantizedTensor:
        """Quantize `w` with the given scale / zero point (float32 values) like `from_hp`."""
        attrs = self.attributes
        block = tuple(attrs["block_size"])
        qtype = qtype_by_name(self.qtype_name)
        if self.cls is Int4Tensor:
            # Int4Tensor.from_hp stores scales (and float zeros) in the weight's half dtype.
            sdt = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32
            domain = attrs["zero_point_domain"]
            s = storage_scale(scale, sdt)
            z: torch.Tensor | None = None
            if domain is ZeroPointDomain.FLOAT:
                assert zero is not None
                z = zero.to(sdt).to(torch.float32)
            elif domain is ZeroPointDomain.INT:
                assert zero is not None
                z = torch.round(zero).clamp(qtype.qmin, qtype.qmax).to(torch.int8)
            q = quantize(w, s, z, qtype, block, domain)
            stored_zero = z.to(sdt) if domain is ZeroPointDomain.FLOAT and z is not None else z
            return Int4Tensor(
                pack_int4(q), s.to(sdt), stored_zero, shape=tuple(w.shape), dtype=w.dtype, **attrs
            )
        s = storage_scale(scale, torch.float32)
        q = quantize(w, s, None, qtype, block)
        return self.cls(q, s, None, shape=tuple(w.shape), dtype=w.dtype, **attrs)


def storage_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A learned scale as the format stores it: positive, rounded to `dtype`, as float32."""
    return scale.to(torch.float32).clamp(min=torch.finfo(dtype).tiny).to(dtype).to(torch.float32)


def initial_qparams(q: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scale and zero point of a PTQ weight as float32 tensors (range-learning init)."""
    scale = q.scale.detach().to(torch.float32).clone()
    zero = q.zero_point
    return scale, None if zero is None else zero.detach().to(torch.float32).clone()


def expand_blocks(t: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """(N // b0, K // b1) per-block values -> (N, K)."""
    n0, n1 = t.shape
    b0, b1 = block
    return t[:, None, :, None].expand(n0, b0, n1, b1).reshape(n0 * b0, n1 * b1)


def sum_blocks(t: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """(N, K) -> (N // b0, K // b1) sums over each block."""
    n, k = t.shape
    b0, b1 = block
    return t.reshape(n // b0, b0, k // b1, b1).sum(dim=(1, 3))


def ste_terms(
    w: torch.Tensor, q: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(w_hat, inside, scale, zero) for the backward of a fake-quantized weight.

    w_hat: dequantized weight (float32). inside: True where w was not clamped, the
    only elements whose gradient passes straight through. scale / zero: per block,
    float32 (zero only in the FLOAT domain), for d w_hat / d scale = (w_hat - w) / s
    inside and (w_hat - z) / s where clamped (z = 0 outside the FLOAT domain). They
    stay per block so that the backward keeps no extra (N, K) tensors.
    """
    qtype = weight_qtype(q)
    domain = zero_point_domain(q)
    block = tuple(q.block_size)
    w_hat = q.dequantize(torch.float32)
    wf = w.detach().to(torch.float32)
    scale = q.scale.to(torch.float32)
    s_full = expand_blocks(scale, block)
    zero = None
    if domain is ZeroPointDomain.FLOAT:
        zero = q.zero_point.to(torch.float32)
        unclamped = torch.round((wf - expand_blocks(zero, block)) / s_full)
    elif domain is ZeroPointDomain.INT:
        unclamped = torch.round(wf / s_full) + expand_blocks(q.zero_point.to(torch.float32), block)
    elif qtype.is_float:
        unclamped = wf / s_full
    else:
        unclamped = torch.round(wf / s_full)
    inside = (unclamped >= qtype.qmin) & (unclamped <= qtype.qmax)
    return w_hat, inside, scale, zero
