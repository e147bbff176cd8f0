"""Float8 weights (e4m3 by default): weight-only, or with dynamic float8 activations."""

from __future__ import annotations

import torch

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.primitives import choose_qparams, dequantize, quantize, quantize_per_token_sym
from lowbit.core.qtype import Mapping, QType, ZeroPointDomain, qtype_by_name
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.common import (
    ActGranularity,
    ActQuant,
    check_activation,
    resolve_kernel,
    uses_act_quant,
)


class Float8Tensor(QuantizedTensor):
    """qdata float8 (N, K); scale (N, 1) per row or (1, 1) per tensor, float32."""

    tensor_data_names = ("qdata", "scale", "zero_point")
    tensor_attribute_names = ("block_size", "act_quant", "kernel")
    blockwise = True

    @classmethod
    def from_hp(cls, w: torch.Tensor, qtype: QType, per_row: bool,
                act_quant: ActQuant | None = None,
                kernel: KernelChoice = KernelChoice.AUTO) -> "Float8Tensor":
        block = (1, w.shape[1]) if per_row else tuple(w.shape)
        scale, _ = choose_qparams(w, qtype, block, Mapping.SYMMETRIC, ZeroPointDomain.NONE)
        q = quantize(w, scale, None, qtype, block)
        return cls(q, scale, None, shape=tuple(w.shape), dtype=w.dtype, block_size=block,
                   act_quant=act_quant, kernel=kernel)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, None, self.block_size,
                          output_dtype=dtype or self.dtype)

    def _available(self, x: torch.Tensor, dynamic: bool) -> dict[KernelChoice, str | None]:
        if not x.is_cuda:
            return {KernelChoice.TORCH: "torch._scaled_mm needs CUDA"}
        cap = torch.cuda.get_device_capability(x.device)
        if cap < (8, 9):
            return {KernelChoice.TORCH: f"float8 GEMMs need compute capability >= 8.9, have {cap}"}
        if not dynamic:
            return {KernelChoice.TORCH: None}
        if self.shape[0] % 16 or self.shape[1] % 16:
            return {KernelChoice.TORCH: f"_scaled_mm needs N and K divisible by 16, got {self.shape}"}
        return {KernelChoice.TORCH: None}

    def _quantize_act(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.act_quant is not None
        qt = qtype_by_name(self.act_quant.qtype)
        if self.act_quant.granularity is ActGranularity.TOKEN:
            return quantize_per_token_sym(x2, qt)
        amax = x2.abs().amax().to(torch.float32).reshape(1, 1)
        s = (amax / qt.qmax).clamp(min=torch.finfo(torch.float32).tiny)
        return (x2.to(torch.float32) / s).clamp(qt.qmin, qt.qmax).to(qt.storage), s

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        check_activation(x, self.shape[1], "float8")
        dynamic = uses_act_quant(self.act_quant, x)
        path = resolve_kernel(self.kernel, x, self._available(x, dynamic), "float8")
        x2 = x.reshape(-1, x.shape[-1])
        if not dynamic:
            y = torch.nn.functional.linear(x2, self.dequantize(x.dtype), bias)
            return y.reshape(*x.shape[:-1], self.shape[0])
        qx, sx = self._quantize_act(x2)
        sw = self.scale.t()
        if path is KernelChoice.TORCH:
            if sx.numel() != 1 or sw.numel() != 1:  # rowwise: both scales per row/col
                sx = sx.expand(qx.shape[0], 1).contiguous()
                sw = sw.expand(1, self.shape[0]).contiguous()
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._scaled_mm(qx, self.qdata.t(), scale_a=sx.float(), scale_b=sw.float(),
                                 bias=None, out_dtype=out_dtype).to(x.dtype)
        else:
            y = ((qx.to(torch.float32) @ self.qdata.to(torch.float32).t()) * sx * sw).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.shape[0])
