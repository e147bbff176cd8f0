"""choose_qparams / quantize / dequantize: the one numerical truth of lowbit.

Every format, every fast kernel's reference and QAT's fake quantization call
these functions, so a weight quantized anywhere in lowbit is bit-identical to
the same weight quantized anywhere else.

A `block_size` has the rank of the tensor; elements in one block share a scale
(and zero point). The scale tensor has shape `x.shape[i] // block_size[i]`.

Rules (all math in float32, `round` is round-half-to-even):
  symmetric:        scale = amax / ((qmax - qmin) / 2)        (int4: amax / 7.5)
                    q = clamp(round(x / scale), qmin, qmax)
  asymmetric INT:   range widened to include 0; scale = (max - min) / (qmax - qmin)
                    zp = clamp(qmin - round(min / scale)); q = clamp(round(x / scale) + zp)
                    x_hat = (q - zp) * scale
  asymmetric FLOAT: scale = (max - min) / (qmax - qmin); zero = min - qmin * scale
                    q = clamp(round((x - zero) / scale)); x_hat = q * scale + zero
  float8:           scale = amax / fmax; q = (x / scale).clamp(-fmax, fmax).to(float8)
Scales (and float zeros) are rounded to their storage dtype *before* q is
computed, so dequantize(quantize(x)) uses exactly the stored numbers.
"""

from __future__ import annotations

import enum

import torch

from lowbit.core.qtype import Mapping, QType, ZeroPointDomain, check_mapping_domain


class ScaleSearch(str, enum.Enum):
    """How weight scales are chosen: plain min/max, or a clipping search that
    minimises the squared rounding error per block (helps int4 most)."""

    MINMAX = "minmax"
    MSE = "mse"


# NOTE: 1.0 down to 0.55 in 0.025 steps; finer grids changed MiniLM int4 cosine < 1e-4.
_CLIP_RATIOS = [1.0 - 0.025 * i for i in range(19)]


def _check_block(shape: tuple[int, ...], block_size: tuple[int, ...]) -> None:
    if len(block_size) != len(shape):
        raise ValueError(f"block_size {block_size} must have the rank of shape {shape}")
    for s, b in zip(shape, block_size):
        if b <= 0 or s % b:
            raise ValueError(f"shape {shape} is not divisible by block_size {block_size}")


def _blocked(x: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor:
    """View x as (n0, b0, n1, b1, ...)."""
    new_shape: list[int] = []
    for s, b in zip(x.shape, block_size):
        new_shape += [s // b, b]
    return x.reshape(new_shape)


def _per_block(t: torch.Tensor) -> torch.Tensor:
    """View a (n0, n1, ...) per-block tensor as (n0, 1, n1, 1, ...) for broadcasting."""
    shape: list[int] = []
    for s in t.shape:
        shape += [s, 1]
    return t.reshape(shape)


def _reduce_dims(rank: int) -> tuple[int, ...]:
    return tuple(range(1, 2 * rank, 2))


def _div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor as a true IEEE division on every device.

    NOTE: CUDA torch turns `tensor / python_scalar` into a multiply by the reciprocal,
    which differs in the last bit from CPU and from the kernels' div_rn; dividing by a
    tensor keeps CPU, CUDA and Triton bit-identical.
    """
    return t / torch.full_like(t, divisor)


def _storage_round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float32)


def _minmax_qparams(
    xb: torch.Tensor,
    qtype: QType,
    mapping: Mapping,
    domain: ZeroPointDomain,
    scale_dtype: torch.dtype,
    ratio: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dims = _reduce_dims(xb.dim() // 2)
    tiny = torch.finfo(scale_dtype).tiny
    if qtype.is_float or mapping is Mapping.SYMMETRIC:
        amax = xb.abs().amax(dim=dims) * ratio
        divisor = qtype.qmax if qtype.is_float else (qtype.qmax - qtype.qmin) / 2
        scale = _storage_round(_div(amax, divisor).clamp(min=tiny), scale_dtype)
        zp = torch.zeros_like(scale, dtype=torch.int8) if domain is ZeroPointDomain.INT else None
        return scale, zp
    lo = xb.amin(dim=dims) * ratio
    hi = xb.amax(dim=dims) * ratio
    span = qtype.qmax - qtype.qmin
    if domain is ZeroPointDomain.INT:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = _storage_round(_div(hi - lo, span).clamp(min=tiny), scale_dtype)
        zp = (qtype.qmin - torch.round(lo / scale)).clamp(qtype.qmin, qtype.qmax)
        return scale, zp.to(torch.int8)
    scale = _storage_round(_div(hi - lo, span).clamp(min=tiny), scale_dtype)
    zero = _storage_round(lo - qtype.qmin * scale, scale_dtype)
    return scale, zero


def choose_qparams(
    x: torch.Tensor,
    qtype: QType,
    block_size: tuple[int, ...],
    mapping: Mapping = Mapping.SYMMETRIC,
    zero_point_domain: ZeroPointDomain = ZeroPointDomain.NONE,
    *,
    scale_dtype: torch.dtype = torch.float32,
    search: ScaleSearch = ScaleSearch.MINMAX,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32 values, rounded to `scale_dtype`) and zero point per block.

    The zero point is int8 for the INT domain, a float (rounded to `scale_dtype`)
    for FLOAT, and None for NONE.
    """
    check_mapping_domain(qtype, mapping, zero_point_domain)
    _check_block(tuple(x.shape), tuple(block_size))
    xb = _blocked(x.detach().to(torch.float32), tuple(block_size))
    scale, zp = _minmax_qparams(xb, qtype, mapping, zero_point_domain, scale_dtype)
    if search is ScaleSearch.MINMAX or qtype.is_float:
        return scale, zp
    best_err = None
    for ratio in _CLIP_RATIOS:
        s, z = _minmax_qparams(xb, qtype, mapping, zero_point_domain, scale_dtype, ratio)
        q = _quantize_blocked(xb, s, z, qtype, zero_point_domain)
        err = (_dequantize_blocked(q, s, z, zero_point_domain) - xb).square()
        err = err.sum(dim=_reduce_dims(xb.dim() // 2))
        if best_err is None:
            best_err, scale, zp = err, s, z
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        if zp is not None and z is not None:
            zp = torch.where(better, z, zp)
    return scale, zp


def _quantize_blocked(
    xb: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    qtype: QType,
    domain: ZeroPointDomain,
) -> torch.Tensor:
    s = _per_block(scale.to(torch.float32))
    if qtype.is_float:
        return (xb / s).clamp(qtype.qmin, qtype.qmax)
    if domain is ZeroPointDomain.FLOAT:
        assert zp is not None
        q = torch.round((xb - _per_block(zp.to(torch.float32))) / s)
    elif domain is ZeroPointDomain.INT:
        assert zp is not None
        q = torch.round(xb / s) + _per_block(zp.to(torch.float32))
    else:
        q = torch.round(xb / s)
    return q.clamp(qtype.qmin, qtype.qmax)


def _dequantize_blocked(
    qb: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, domain: ZeroPointDomain
) -> torch.Tensor:
    s = _per_block(scale.to(torch.float32))
    q = qb.to(torch.float32)
    if domain is ZeroPointDomain.FLOAT:
        assert zp is not None
        return q * s + _per_block(zp.to(torch.float32))
    if domain is ZeroPointDomain.INT:
        assert zp is not None
        return (q - _per_block(zp.to(torch.float32))) * s
    return q * s


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qtype: QType,
    block_size: tuple[int, ...],
    zero_point_domain: ZeroPointDomain = ZeroPointDomain.NONE,
) -> torch.Tensor:
    """Quantize x to `qtype.storage` (int8 holds int4 values unpacked)."""
    _check_block(tuple(x.shape), tuple(block_size))
    xb = _blocked(x.to(torch.float32), tuple(block_size))
    q = _quantize_blocked(xb, scale, zero_point, qtype, zero_point_domain)
    return q.reshape(x.shape).to(qtype.storage)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: tuple[int, ...],
    zero_point_domain: ZeroPointDomain = ZeroPointDomain.NONE,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize` (computed in float32, then cast to output_dtype)."""
    _check_block(tuple(q.shape), tuple(block_size))
    qb = _blocked(q, tuple(block_size))
    out = _dequantize_blocked(qb, scale, zero_point, zero_point_domain)
    return out.reshape(q.shape).to(output_dtype)


def quantize_per_token_sym(
    x: torch.Tensor, qtype: QType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric activation quantization over the last dim.

    Returns (q, scale) with scale of shape x.shape[:-1] + (1,), float32.
    For int8 activations the grid is [-127, 127] (scale = amax / 127).
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = _div(amax, qtype.qmax).clamp(min=torch.finfo(torch.float32).tiny)
    q = xf / scale
    if qtype.is_float:
        return q.clamp(qtype.qmin, qtype.qmax).to(qtype.storage), scale
    return torch.round(q).clamp(qtype.qmin, qtype.qmax).to(qtype.storage), scale
