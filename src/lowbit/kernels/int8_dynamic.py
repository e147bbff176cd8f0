"""W8A8 on the Triton kernels: int8 dynamic per-token activations x int8 per-row weights.

    y = (act_quant(x) (int8, one pass) @ W8^T -> int32) * s_x[m] * s_w[n] (+ bias[n])

The activation pass is `w4a8.act_quant` (one read of x, bit-identical to quantize_per_token_sym);
the GEMM is `w4a8.prefill.int8_gemm` (TMA operand loads and a persistent grid on Hopper for
16-bit outputs, the pointer kernel otherwise) with both scales and the bias in its epilogue, so
no float32 (M, N) intermediate is written. A torch.library custom op (`lowbit::int8_dynamic_linear`,
fake implementation included), so torch.compile(fullgraph=True) and CUDA graphs see one node.
"""

from __future__ import annotations

import torch


def _int8_dynamic_linear_impl(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                              bias: torch.Tensor | None) -> torch.Tensor:
    from lowbit.kernels.w4a8.act_quant import act_quant
    from lowbit.kernels.w4a8.prefill import int8_gemm

    if x.dim() != 2 or qw.dim() != 2 or x.shape[1] != qw.shape[1]:
        raise ValueError(f"int8_dynamic_linear: x (M, K) and weight (N, K), got {tuple(x.shape)} and "
                         f"{tuple(qw.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"int8_dynamic_linear takes fp16/bf16 activations, got {x.dtype}")
    if qw.dtype != torch.int8:
        raise ValueError(f"int8_dynamic_linear takes an int8 weight, got {qw.dtype}")
    if sw.numel() != qw.shape[0]:
        raise ValueError(f"int8_dynamic_linear takes one scale per weight row: {sw.numel()} scales for "
                         f"{qw.shape[0]} rows")
    qa, sa = act_quant(x)
    return int8_gemm(qa, sa, qw.contiguous(), sw.reshape(-1, 1), bias, x.shape[1], x.dtype)


int8_dynamic_linear_op = torch.library.custom_op("lowbit::int8_dynamic_linear",
                                                 mutates_args=())(_int8_dynamic_linear_impl)


@int8_dynamic_linear_op.register_fake
def _(x, qw, sw, bias):
    return x.new_empty((x.shape[0], qw.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qw, sw, bias = inputs
    ctx.save_for_backward(qw, sw)
    ctx.meta = (x.dtype, bias is not None)


def _backward(ctx, grad):
    """Gradient w.r.t. x and bias through the dequantized weight (weights are frozen)."""
    qw, sw = ctx.saved_tensors
    dtype, has_bias = ctx.meta
    w = qw.to(torch.float32) * sw.reshape(-1, 1).to(torch.float32)
    grad_x = (grad.to(torch.float32) @ w).to(dtype)
    return grad_x, None, None, (grad.sum(0) if has_bias else None)


int8_dynamic_linear_op.register_autograd(_backward, setup_context=_setup_context)


def int8_dynamic_linear(x2: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Entry point used by Int8Tensor: x2 (M, K) fp16/bf16, qw (N, K) int8, sw (N, 1) -> (M, N)."""
    from lowbit.kernels import dispatches_op, needs_grad

    if dispatches_op(x2, qw, needs_grad(x2, bias)):
        return int8_dynamic_linear_op(x2, qw, sw, bias)
    return _int8_dynamic_linear_impl(x2, qw, sw, bias)
