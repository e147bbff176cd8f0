"""Baselines that the LLM benchmark compares lowbit against.

* torch-int4: torch's own int4 weight-only GEMM (the "tinygemm" kernel behind gpt-fast and
  torchao's int4wo), called directly:
      torch.ops.aten._convert_weight_to_int4pack(Tensor self, int innerKTiles) -> Tensor
      torch.ops.aten._weight_int4pack_mm(Tensor self, Tensor mat2, int qGroupSize,
                                         Tensor qScaleAndZeros) -> Tensor
  (CPU twins: `_convert_weight_to_int4pack_for_cpu`, `_weight_int4pack_mm_for_cpu`).
  On CUDA `self` of the convert op is uint8 (N, K/2) holding unsigned nibbles u = q + 8 with
  the EVEN k in the HIGH nibble (the opposite of lowbit's packing); on CPU it is int32 (N, K)
  unpacked. qScaleAndZeros is (K/group, N, 2) = [scale, zero] with w = (u - 8) * scale + zero,
  which is exactly lowbit's asymmetric FLOAT-zero int4: w = q * scale + zero. So the weights are
  quantized by lowbit's Int4WeightOnlyConfig and only the kernel differs.
  CUDA constraints: bf16 activations, N % 8 == 0, K % (innerKTiles * 16) == 0.
* torchao-int4: `torchao.quantization.quantize_(m, Int4WeightOnlyConfig(group_size=...))` when
  torchao is importable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.core.kernel_choice import KernelChoice
from lowbit.formats.configs import Int4WeightOnlyConfig
from lowbit.formats.int4 import Int4Tensor

INNER_K_TILES = 8


def tinygemm_unsupported_reason(
    n: int, k: int, group_size: int, inner_k_tiles: int = INNER_K_TILES
) -> str | None:
    if group_size not in (32, 64, 128, 256):
        return f"group_size={group_size} (tinygemm takes 32, 64, 128, 256)"
    if n % 8:
        return f"N={n} is not a multiple of 8"
    if k % (inner_k_tiles * 16) or k % group_size:
        return f"K={k} is not a multiple of {inner_k_tiles * 16} and of group_size={group_size}"
    return None


class TinyGemmInt4Linear(nn.Module):
    """A linear layer running torch's `_weight_int4pack_mm` on an int4 (g=group_size) weight."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 128,
        inner_k_tiles: int = INNER_K_TILES,
    ) -> None:
        super().__init__()
        n, k = weight.shape
        reason = tinygemm_unsupported_reason(n, k, group_size, inner_k_tiles)
        if reason is not None:
            raise ValueError(f"torch-int4 (tinygemm) cannot take a {n}x{k} weight: {reason}")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.cuda_kernel = weight.is_cuda
        # NOTE: the CUDA kernel takes only bf16 activations and bf16 scales/zeros.
        self.act_dtype = torch.bfloat16 if self.cuda_kernel else weight.dtype
        cfg = Int4WeightOnlyConfig(group_size=group_size, kernel=KernelChoice.REFERENCE)
        q = cfg.quantize_weight(weight.detach())
        assert isinstance(q, Int4Tensor)
        u = q.int_data().to(torch.int32) + 8  # unsigned nibbles 0..15
        if self.cuda_kernel:
            nibbles = ((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), inner_k_tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), inner_k_tiles)
        _, scale, zero = q.inner_tensors()  # (N, K / group) each; asymmetric FLOAT zero
        assert scale is not None and zero is not None
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed_weight", packed)
        self.register_buffer("scales_and_zeros", sz.to(self.act_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()
        if self.cuda_kernel:
            y = torch.ops.aten._weight_int4pack_mm(
                x2, self.packed_weight, self.group_size, self.scales_and_zeros
            )
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed_weight, self.group_size, self.scales_and_zeros
            )
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


class TinyGemmInt4Quantizer:
    """Swap every nn.Linear inside a module for TinyGemmInt4Linear (shapes it cannot take stay)."""

    def __init__(self, group_size: int = 128) -> None:
        self.group_size = group_size
        self.label = "torch-int4"

    def apply(self, parent: nn.Module) -> None:
        swaps = []
        for fqn, m in parent.named_modules():
            if fqn and isinstance(m, nn.Linear):
                n, k = m.weight.shape
                if tinygemm_unsupported_reason(n, k, self.group_size) is None:
                    owner, _, leaf = fqn.rpartition(".")
                    swaps.append(
                        (
                            parent.get_submodule(owner),
                            leaf,
                            TinyGemmInt4Linear(m.weight, m.bias, self.group_size),
                        )
                    )
        for owner, leaf, new in swaps:
            setattr(owner, leaf, new)

    def describe(self) -> dict[str, Any] | None:
        return {
            "type": "torch._weight_int4pack_mm (tinygemm)",
            "group_size": self.group_size,
            "inner_k_tiles": INNER_K_TILES,
            "weights": "lowbit Int4WeightOnlyConfig (asym, MSE)",
        }


class TorchAOInt4Quantizer:
    """torchao's int4 weight-only; raises ImportError (with the reason) without torchao."""

    def __init__(self, group_size: int = 128) -> None:
        try:
            import torchao  # noqa: F401
            from torchao.quantization import Int4WeightOnlyConfig as AOInt4
            from torchao.quantization import quantize_ as ao_quantize_
        except Exception as e:
            raise ImportError(f"torchao is not usable here ({type(e).__name__}: {e})") from None
        self._config = AOInt4(group_size=group_size)
        self._quantize = ao_quantize_
        self.group_size = group_size
        self.label = "torchao-int4"

    def apply(self, parent: nn.Module) -> None:
        self._quantize(parent, self._config)

    def describe(self) -> dict[str, Any] | None:
        import torchao

        return {
            "type": "torchao Int4WeightOnlyConfig",
            "group_size": self.group_size,
            "torchao": getattr(torchao, "__version__", "?"),
        }
