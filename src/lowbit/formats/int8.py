"""Int8 weights (per-row symmetric): weight-only, or with dynamic int8 activations (W8A8)."""

from __future__ import annotations

import torch

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.primitives import choose_qparams, dequantize, quantize, quantize_per_token_sym
from lowbit.core.qtype import INT8, INT8_SYM, Mapping, ZeroPointDomain
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.common import (
    ActQuant,
    check_activation,
    int_group_dot,
    resolve_kernel,
    token_count,
    uses_act_quant,
)

# NOTE: AUTO runs W8A8 on the Triton kernels (act_quant + int8_gemm) from this many tokens on.
# H100, benchmarks/bench_linear.py (results/linear_w8a8_h100.json, sha aea1fba, ten Llama shapes):
# vs torch._int_mm with eager per-token quantization and an eager float32 epilogue (what the TORCH
# path runs), the Triton path was 1.25-2.85x faster at M=16, 3.3-6.3x at M=2048 and 3.2-7.6x at
# M=8192 (kernel=TRITON column). Below 16 tokens it was not measured, so those keep torch._int_mm.
TRITON_MIN_TOKENS = 16


class Int8Tensor(QuantizedTensor):
    """qdata int8 (N, K); scale (N, 1) float; optional activation quantization."""

    tensor_data_names = ("qdata", "scale", "zero_point")
    tensor_attribute_names = ("block_size", "act_quant", "kernel")
    blockwise = True

    @classmethod
    def from_hp(cls, w: torch.Tensor, act_quant: ActQuant | None = None,
                kernel: KernelChoice = KernelChoice.AUTO) -> "Int8Tensor":
        block = (1, w.shape[-1])
        scale, _ = choose_qparams(w, INT8, block, Mapping.SYMMETRIC, ZeroPointDomain.NONE,
                                  scale_dtype=torch.float32)
        q = quantize(w, scale, None, INT8, block)
        return cls(q, scale, None, shape=tuple(w.shape), dtype=w.dtype, block_size=block,
                   act_quant=act_quant, kernel=kernel)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, None, self.block_size,
                          output_dtype=dtype or self.dtype)

    def _available(self, x: torch.Tensor, dynamic: bool) -> dict[KernelChoice, str | None]:
        needs = "torch._int_mm needs CUDA" if dynamic else "the int8 -> bf16/fp16 cuBLAS path needs CUDA"
        available: dict[KernelChoice, str | None] = {}
        if dynamic and (self.kernel is KernelChoice.TRITON or self._auto_takes_triton(x)):
            available[KernelChoice.TRITON] = self._triton_reason(x)  # AUTO tries it first
        elif not dynamic and self.kernel is KernelChoice.TRITON:
            # weight-only calls (below a decode threshold): the TORCH path on CUDA, else the reference
            available[KernelChoice.TRITON] = None
        available[KernelChoice.TORCH] = None if self.qdata.is_cuda else needs
        return available

    def _auto_takes_triton(self, x: torch.Tensor) -> bool:
        """AUTO's choice for a dynamic call: CUDA, a concrete token count >= TRITON_MIN_TOKENS, no
        gradient wanted for x (the TORCH path's gradient is kept for training-time calls)."""
        if self.kernel is not KernelChoice.AUTO or not x.is_cuda:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        tokens = token_count(x)
        return isinstance(tokens, int) and tokens >= TRITON_MIN_TOKENS

    def _triton_reason(self, x: torch.Tensor) -> str | None:
        from lowbit.kernels import triton_unavailable_reason

        reason = triton_unavailable_reason(x)
        if reason is None and x.dtype not in (torch.float16, torch.bfloat16):
            reason = f"the Triton kernels take fp16/bf16 activations, got {x.dtype}"
        if reason is None and self.shape[0] * self.shape[1] >= 2**31:
            reason = (f"N*K reaches 2**31 (N={self.shape[0]}, K={self.shape[1]}): beyond the int8 GEMM's "
                      "int32 offsets")
        return reason

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        check_activation(x, self.shape[1], "int8")
        dynamic = uses_act_quant(self.act_quant, x)
        path = resolve_kernel(self.kernel, x, self._available(x, dynamic), "int8")
        x2 = x.reshape(-1, x.shape[-1])
        if path is KernelChoice.TRITON and not dynamic:
            path = KernelChoice.TORCH if x.is_cuda else KernelChoice.REFERENCE
        if path is KernelChoice.TRITON:
            from lowbit.kernels.int8_dynamic import int8_dynamic_linear

            # one-pass activation quantization + the int8 GEMM, scales and bias in its epilogue; a
            # bias of another dtype is added afterwards, with the same type promotion as the TORCH path
            fused_bias = bias if bias is None or bias.dtype == x.dtype else None
            y = int8_dynamic_linear(x2, self.qdata, self.scale, fused_bias)
            if bias is not None and fused_bias is None:
                y = y + bias
            return y.reshape(*x.shape[:-1], self.shape[0])
        if not dynamic and path is KernelChoice.TORCH:
            # int8 -> x.dtype is exact; the per-row scale is applied to the output, so the
            # GEMM reads int8 weights (inductor fuses the cast into its matmul template).
            y = torch.mm(x2, self.qdata.to(x.dtype).t()) * self.scale.t().to(x.dtype)
        elif not dynamic:
            y = torch.nn.functional.linear(x2, self.dequantize(x.dtype))
        else:
            qx, sx = quantize_per_token_sym(x2, INT8_SYM)
            if path is KernelChoice.TORCH:
                acc = _int_mm_padded(qx, self.qdata).to(torch.float32)
            else:
                acc = int_group_dot(qx, self.qdata, self.shape[1], 128)[0]
            y = (acc * sx * self.scale.t()).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.shape[0])


def _int_mm_padded(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """torch._int_mm needs M > 16 on CUDA: pad small M with zero rows."""
    m = qx.shape[0]
    if m <= 16:
        qx = torch.nn.functional.pad(qx, (0, 0, 0, 17 - m))
    return torch._int_mm(qx, qw.t())[:m]


