"""The three GEMMs of a float8 linear as one autograd.Function.

With x (M, K) the input rows, W (N, K) the weight and g (M, N) the output gradient:

    output      = x @ W^T       NT operands: x (M, K)      and W (N, K)      reduce over K
    grad_input  = g @ W         NT operands: g (M, N)      and W^T (K, N)    reduce over N
    grad_weight = g^T @ x       NT operands: g^T (N, M)    and x^T (K, M)    reduce over M (tokens)

Each operand is cast with its scale taken along the axis its GEMM reduces over: for axiswise
scaling the weight has one scale per output row in the forward and one per input column in
grad_input, and in grad_weight g and x have one scale per *column* (the amax over tokens). A
tensorwise operand is cast once and its float8 copy transposed for the other GEMM.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.float8_training.config import Float8TrainingConfig, ScalingGranularity
from lowbit.float8_training.fsdp import Float8GatheredWeight
from lowbit.float8_training.kernels import Float8Operand, cast_to_float8, float8_mm

_TENSORWISE = ScalingGranularity.TENSORWISE


class Float8LinearFunction(torch.autograd.Function):
    """y = x @ w^T for 2-D x, with float8 GEMMs in forward and backward as `config` says."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w: torch.Tensor, config: Float8TrainingConfig, emulate: bool
    ) -> torch.Tensor:
        ctx.config, ctx.emulate = config, emulate
        # The GEMM dtypes are explicit here: an enclosing autocast must not re-cast the emulated
        # fp32 math or the high-precision GEMMs (Float8Linear already moved x to autocast's dtype).
        with torch.autocast(x.device.type, enabled=False):
            gemm = config.gemm_output
            xq = wq = None
            if gemm.high_precision:
                y = x @ w.to(x.dtype).t()
            else:
                xq = cast_to_float8(x, config.cast_input)
                if isinstance(w, Float8GatheredWeight):  # FSDP2 gathered it already cast
                    wq = w.operand()
                else:
                    wq = cast_to_float8(w, config.cast_weight)
                y = float8_mm(xq, wq, x.dtype, gemm.use_fast_accum, emulate)
        # Save the least that the backward needs: a tensorwise float8 input serves the grad_weight
        # GEMM as it is (half the bytes of a bf16 input); otherwise the high-precision tensors.
        gw_fp8 = not config.gemm_grad_weight.high_precision
        keep_xq = gw_fp8 and config.cast_input.granularity is _TENSORWISE
        if keep_xq and xq is None:
            xq = cast_to_float8(x, config.cast_input)
        keep_wq = wq is not None and config.cast_weight.granularity is _TENSORWISE
        saved_x = (xq.qdata, xq.scale) if keep_xq and xq is not None else (None, None)
        saved_w = (wq.qdata, wq.scale) if keep_wq and wq is not None else (None, None)
        ctx.save_for_backward(None if keep_xq else x, w, *saved_x, *saved_w)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, w, xq_data, xq_scale, wq_data, wq_scale = ctx.saved_tensors
        config: Float8TrainingConfig = ctx.config
        emulate: bool = ctx.emulate
        g = g.to(ctx.x_dtype).contiguous()
        grad_x = grad_w = None
        gq: Float8Operand | None = None  # cast of g along N, reused by grad_weight when tensorwise
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gemm = config.gemm_grad_input
                if gemm.high_precision:
                    grad_x = g @ w.to(g.dtype)
                else:
                    gq = cast_to_float8(g, config.cast_grad_output)
                    if wq_data is not None:
                        w_t = Float8Operand(wq_data, wq_scale).transposed()
                    else:
                        w_t = cast_to_float8(w.t(), config.cast_weight)
                    grad_x = float8_mm(gq, w_t, g.dtype, gemm.use_fast_accum, emulate)
            if ctx.needs_input_grad[1]:
                gemm = config.gemm_grad_weight
                if gemm.high_precision:
                    grad_w = g.t() @ x
                else:
                    cast_g = config.cast_grad_output
                    if gq is not None and cast_g.granularity is _TENSORWISE:
                        g_t = gq.transposed()
                    else:
                        g_t = cast_to_float8(g.t(), cast_g)
                    if xq_data is not None:
                        x_t = Float8Operand(xq_data, xq_scale).transposed()
                    else:
                        x_t = cast_to_float8(x.t(), config.cast_input)
                    grad_w = float8_mm(g_t, x_t, g.dtype, gemm.use_fast_accum, emulate)
                grad_w = grad_w.to(w.dtype)
        return grad_x, grad_w, None, None
