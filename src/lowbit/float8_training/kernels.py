"""Float8 casts and the NT float8 GEMM of float8 training, with the backend choice.

Every GEMM here is "NT": out (R1, R2) = a (R1, K) @ b (R2, K)^T, both operands given with the
reduction axis K last, as F.linear takes them. For axiswise scaling each operand then carries one
scale per row: a_scale (R1, 1), b_scale (R2, 1), the max over the reduced axis. Callers lay out
each GEMM's operands that way (a transpose of the original tensor where the GEMM reduces over its
first axis, e.g. over tokens for grad_weight).

Casts are plain torch ops (abs, amax, clamp, mul, to(float8)) so torch.compile fuses them into
one or two kernels around each GEMM. The float8 value is q = clamp(t / scale) with
scale = amax / max_representable: a dequantized value is q * scale (the convention of
torch._scaled_mm's scale_a / scale_b).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lowbit.float8_training.config import CastConfig, Float8TrainingConfig, ScalingGranularity

# An all-zero row would give scale 0 and 0/0 = NaN; this floor keeps such rows exactly zero.
AMAX_EPS = 1e-12
TENSORWISE_CAPABILITY = (8, 9)  # Ada / Hopper: float8 tensor cores, tensorwise cuBLASLt kernel
AXISWISE_CAPABILITY = (9, 0)  # rowwise-scaled _scaled_mm is a Hopper (sm90+) kernel
MM_ALIGN = 16  # _scaled_mm wants K and the second operand's rows divisible by 16


class Float8Operand(NamedTuple):
    """qdata (R, K) float8, row-major; scale float32, 0-dim (tensorwise) or (R, 1) (axiswise)."""

    qdata: torch.Tensor
    scale: torch.Tensor

    def transposed(self) -> "Float8Operand":
        """The same float8 values as a (K, R) row-major operand: only valid for a tensorwise scale."""
        assert self.scale.dim() == 0, "an axiswise operand must be re-cast along the other axis"
        return Float8Operand(self.qdata.t().contiguous(), self.scale)


def cast_to_float8(t: torch.Tensor, cast: CastConfig) -> Float8Operand:
    """Dynamic scaling of a 2-D tensor whose last axis is the GEMM's reduction axis."""
    if cast.granularity is ScalingGranularity.AXISWISE:
        amax = t.abs().amax(dim=-1, keepdim=True)
    else:
        amax = t.abs().amax()
    return cast_with_amax(t, amax, cast.dtype)


def scale_and_saturate(
    t: torch.Tensor, inv_scale: torch.Tensor, fmax: float, dtype: torch.dtype
) -> torch.Tensor:
    # Multiply by the reciprocal, not divide: one fused mul per element. The clamp saturates the
    # rounding overshoot at the top of the range (e4m3fn has no inf: it would become NaN).
    return (t.to(torch.float32) * inv_scale).clamp(-fmax, fmax).to(dtype)


def cast_with_amax(t: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype,
                   elementwise: Callable[..., torch.Tensor] = scale_and_saturate) -> Float8Operand:
    """t cast to float8 `dtype` with the scale of absmax `amax` (a scalar, or one per row).
    `elementwise`: scale_and_saturate, or a fused (compiled) version of it."""
    fmax = torch.finfo(dtype).max
    inv_scale = fmax / amax.to(torch.float32).clamp(min=AMAX_EPS)
    q = elementwise(t, inv_scale, fmax, dtype)
    return Float8Operand(q.contiguous(), inv_scale.reciprocal())


def _row_scale(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, 1) float32 scale; a tensorwise scalar is expanded when the other side is axiswise."""
    return scale.reshape(-1, 1).expand(rows, 1).contiguous() if scale.dim() == 0 else scale


def _pad_k(q: torch.Tensor, pad: int) -> torch.Tensor:
    # Zero bytes are +0.0 in both float8 formats; padding the reduction axis adds nothing to the sum.
    # Padding a uint8 view of the bytes needs no float8 support from the pad kernel on any backend.
    return F.pad(q.view(torch.uint8), (0, pad)).view(q.dtype)


def float8_mm(
    a: Float8Operand, b: Float8Operand, out_dtype: torch.dtype, use_fast_accum: bool, emulate: bool
) -> torch.Tensor:
    """a @ b^T in out_dtype. Emulated: fp32 math on the dequantized values (the reference)."""
    if emulate:
        out = a.qdata.to(torch.float32) @ b.qdata.to(torch.float32).t()
        if a.scale.dim() == 0 and b.scale.dim() == 0:
            out.mul_(a.scale * b.scale)  # one pass over the output (CPU emulation speed matters)
        else:
            out.mul_(a.scale).mul_(b.scale if b.scale.dim() == 0 else b.scale.t())
        return out.to(out_dtype)
    rows_a, k = a.qdata.shape
    rows_b = b.qdata.shape[0]
    qa, qb = a.qdata, b.qdata
    if k % MM_ALIGN:  # only the grad_weight GEMM (K = tokens) can get here; dims are checked at convert
        pad = MM_ALIGN - k % MM_ALIGN
        qa, qb = _pad_k(qa, pad), _pad_k(qb, pad)
    sa, sb = a.scale, b.scale
    if sa.dim() != sb.dim():  # mixed granularity: run the rowwise kernel with a repeated scale
        sa, sb = _row_scale(sa, rows_a), _row_scale(sb, rows_b)
    rowwise = sa.dim() != 0
    # _scaled_mm: second operand column-major (a transposed row-major tensor), rowwise scales
    # (M, 1) and (1, N); the rowwise kernel writes only bf16.
    mm_dtype = torch.bfloat16 if rowwise or out_dtype not in (torch.float16, torch.float32) else out_dtype
    out = torch._scaled_mm(
        qa,
        qb.t(),
        scale_a=sa.contiguous(),
        scale_b=sb.t().contiguous() if rowwise else sb,
        bias=None,
        out_dtype=mm_dtype,
        use_fast_accum=use_fast_accum,
    )
    return out.to(out_dtype)


@torch.compiler.assume_constant_result
def cuda_capability(index: int) -> tuple[int, int, str]:
    """(major, minor, name) of CUDA device `index`. A constant to torch.compile: it is read once while
    tracing, so the backend choice in a compiled forward costs nothing and adds no guard or break."""
    props = torch.cuda.get_device_properties(index)
    return props.major, props.minor, props.name


def float8_unsupported_reason(config: Float8TrainingConfig, device: torch.device) -> str | None:
    """Why torch._scaled_mm cannot run this config's float8 GEMMs on `device`; None when it can."""
    need = AXISWISE_CAPABILITY if config.uses_axiswise() else TENSORWISE_CAPABILITY
    what = "axiswise (rowwise) scaling" if config.uses_axiswise() else "float8 GEMMs"
    requirement = f"{what} need an NVIDIA GPU of compute capability >= {need[0]}.{need[1]}"
    if device.type != "cuda" or torch.version.hip is not None:
        return f"{requirement} (torch._scaled_mm); the device is {device.type}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor, name = cuda_capability(index)
    if (major, minor) < need:
        return f"{requirement}; {name} has {major}.{minor}"
    return None


def resolve_emulate(config: Float8TrainingConfig, device: torch.device) -> bool:
    """The backend choice: True = emulate, False = torch._scaled_mm; raises when neither is allowed."""
    if config.emulate:
        return True
    reason = float8_unsupported_reason(config, device)
    if reason is None:
        return False
    if config.emulate is None and device.type != "cuda":
        return True  # CPU, MPS...: emulation is the only path and what the user expects there
    raise RuntimeError(
        f"float8 training: {reason}. Pass Float8TrainingConfig(emulate=True) to run the "
        "emulated (slow, numerically equivalent) path instead"
    )
