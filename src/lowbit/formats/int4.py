"""Packed int4 weights: weight-only (W4A16) and with dynamic int8 activations (W4A8).

qdata: uint8 (N, K // 2), two int4 per byte along K (nibble order: core/packing.py).
scale: (N, K // group) in the weight's dtype; zero_point per ZeroPointDomain:
  NONE -> None; INT -> int8 (N, G); FLOAT -> float (N, G).
W4A8 math (reference and kernels): with per-token int8 activations qx, sx,
  y[m, n] = sx[m] * sum_g ( scale[n, g] * (qx_g[m] . q_g[n]) + c[n, g] * sum(qx_g[m]) )
  where c = zero (FLOAT), -zero_point * scale (INT), 0 (NONE). The dot products
  are exact integers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.packing import pack_int4, unpack_int4
from lowbit.core.primitives import (
    ScaleSearch,
    choose_qparams,
    dequantize,
    quantize,
    quantize_per_token_sym,
)
from lowbit.core.qtype import INT4, INT8_SYM, Mapping, ZeroPointDomain
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.common import (
    ActQuant,
    check_activation,
    int_group_dot,
    resolve_kernel,
    token_count,
    uses_act_quant,
)

if TYPE_CHECKING:
    from lowbit.kernels.w4a8.gemv_dp4a import NormIn


class Int4Tensor(QuantizedTensor):
    tensor_data_names = ("qdata", "scale", "zero_point")
    tensor_attribute_names = ("block_size", "zero_point_domain", "act_quant", "kernel")
    blockwise = True

    @classmethod
    def from_hp(cls, w: torch.Tensor, group_size: int | None, mapping: Mapping,
                zero_point_domain: ZeroPointDomain, act_quant: ActQuant | None = None,
                kernel: KernelChoice = KernelChoice.AUTO,
                search: ScaleSearch = ScaleSearch.MINMAX) -> "Int4Tensor":
        n, k = w.shape
        if k % 2:
            raise ValueError(f"int4 packing needs an even K, got K={k}")
        block = (1, group_size or k)
        scale_dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32
        scale, zp = choose_qparams(w, INT4, block, mapping, zero_point_domain,
                                   scale_dtype=scale_dtype, search=search)
        q = quantize(w, scale, zp, INT4, block, zero_point_domain)
        if zp is not None and zero_point_domain is ZeroPointDomain.FLOAT:
            zp = zp.to(scale_dtype)
        return cls(pack_int4(q), scale.to(scale_dtype), zp, shape=(n, k), dtype=w.dtype,
                   block_size=block, zero_point_domain=zero_point_domain, act_quant=act_quant,
                   kernel=kernel)

    @property
    def group_size(self) -> int:
        return self.block_size[1]

    def int_data(self) -> torch.Tensor:
        return unpack_int4(self.qdata)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.int_data(), self.scale, self.zero_point, self.block_size,
                          self.zero_point_domain, output_dtype=dtype or self.dtype)

    def zero_correction(self) -> torch.Tensor | None:
        """c[n, g] of the W4A8 formula (float32), None for symmetric weights."""
        zp = self.zero_point
        if zp is None:
            return None
        if self.zero_point_domain is ZeroPointDomain.FLOAT:
            return zp.to(torch.float32)
        return -zp.to(torch.float32) * self.scale.to(torch.float32)

    # -- execution -----------------------------------------------------------
    def _available(self, x: torch.Tensor, dynamic: bool) -> dict[KernelChoice, str | None]:
        from lowbit.kernels import triton_unavailable_reason

        reason = triton_unavailable_reason(x)
        if reason is None and self.zero_point_domain is not ZeroPointDomain.NONE and dynamic:
            reason = "the Triton W4A8 kernels take symmetric weights (zero_point_domain='none')"
        if reason is None and x.dtype not in (torch.float16, torch.bfloat16):
            reason = f"the Triton kernels take fp16/bf16 activations, got {x.dtype}"
        available = {KernelChoice.TRITON: reason}
        if dynamic and (self.kernel is KernelChoice.CUTLASS or self._auto_cutlass(x)):
            from lowbit.kernels.cutlass import w4a8 as cutlass_w4a8

            mma = cutlass_w4a8._takes_mma(self, token_count(x))
            cutlass = {KernelChoice.CUTLASS: cutlass_w4a8.unavailable_reason(
                x, self.shape[0], self.shape[1], self.group_size,
                self.zero_point_domain is ZeroPointDomain.NONE, mma=mma)}
            available = cutlass | available  # AUTO tries the first usable entry
        elif self.kernel is KernelChoice.CUTLASS:
            available[KernelChoice.CUTLASS] = "the CUTLASS kernel is W4A8 only (int8 activations)"
        return available

    def _auto_cutlass(self, x: torch.Tensor) -> bool:
        """AUTO consults the native extension's measured tables (CUTLASS_AUTO_SHAPES, MMA_AUTO_SHAPES)."""
        if self.kernel is not KernelChoice.AUTO or not x.is_cuda:
            return False
        from lowbit.kernels.cutlass.w4a8 import auto_prefers_cutlass

        return auto_prefers_cutlass(self.shape[0], self.shape[1], token_count(x), self.group_size)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fmt = "w4a8" if self.act_quant is not None else "int4"
        check_activation(x, self.shape[1], fmt)
        dynamic = uses_act_quant(self.act_quant, x)
        path = resolve_kernel(self.kernel, x, self._available(x, dynamic), fmt)
        x2 = x.reshape(-1, x.shape[-1])
        if path is KernelChoice.TRITON:
            from lowbit.kernels.w4a8 import op

            y = op.int4_linear(x2, self, bias, quantize_activations=dynamic)
        elif path is KernelChoice.CUTLASS:
            from lowbit.kernels.cutlass.w4a8 import w4a8_linear

            y = w4a8_linear(x2, self, bias)
        elif dynamic:
            y = w4a8_linear_reference(x2, self, bias)
        else:
            y = torch.nn.functional.linear(x2, self.dequantize(x.dtype), bias)
        return y.reshape(*x.shape[:-1], self.shape[0])

    # -- activations quantized by their producer (fused RMSNorm / SwiGLU) --------------------
    def _dynamic_triton(self, x: torch.Tensor) -> bool:
        """True when this weight, called on x, quantizes x per token to int8 (symmetric int4
        weight) and runs a Triton kernel."""
        act = self.act_quant
        if act is None or act.qtype != "int8_sym" or act.granularity.value != "token":
            return False
        if self.kernel not in (KernelChoice.AUTO, KernelChoice.TRITON) or x.shape[-1] != self.shape[1]:
            return False
        if not uses_act_quant(act, x) or self.zero_point is not None:
            return False
        try:  # the path _linear would take
            path = resolve_kernel(self.kernel, x, self._available(x, dynamic=True), "w4a8")
        except RuntimeError:
            return False
        return path is KernelChoice.TRITON

    def takes_prequantized(self, x: torch.Tensor) -> bool:
        """True when this weight, called on x, would quantize x per token to int8 and then run a
        Triton int8 kernel (the prefill GEMM, the decode kernel, or gemv_q for one long per-row
        row): a producer may then hand over (q, scale) instead of x (linear_prequantized), skipping
        act_quant's launch and pass over x. The same rule as a compiled graph's
        (op.quantizes_in_graph)."""
        from lowbit.kernels.w4a8.op import quantizes_in_graph

        return self._dynamic_triton(x) and quantizes_in_graph(token_count(x), self.shape[1], self.group_size,
                                                              True, "auto")

    def streams_paired(self, x: torch.Tensor) -> bool:
        """True when this weight (an even number of rows), called on x, runs the streaming dp4a
        GEMV (a few tokens), whose paired epilogues then apply: linear_swiglu (a fused [gate; up]
        projection) and linear_rope_cache (a fused [q; k; v] projection)."""
        from lowbit.kernels.w4a8.gemv_dp4a import stream_supported
        from lowbit.kernels.w4a8.op import _dp4a_takes

        if self.shape[0] % 2 or not self._dynamic_triton(x):
            return False
        m, k = token_count(x), self.shape[1]
        group = 0 if self.group_size >= k else self.group_size
        return _dp4a_takes(m, k, self.group_size, "auto") and stream_supported(m, k, group)

    def linear_swiglu(self, x: torch.Tensor, bias: torch.Tensor | None, norm: NormIn | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., K) -> (silu(gate) * up (..., N/2) in x's dtype, amax (M, P) float32) where
        streams_paired(x): the SwiGLU of this [gate; up] projection's output, rounded as
        fused.swiglu(linear(x)) rounds, from one kernel, with per-program absmaxes of each row
        for act_quant_from_amax. norm: x is the residual stream and the projection takes its
        RMSNorm, folded into the kernel's prologue (gemv_dp4a.NormIn, rows (M, K))."""
        from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_swiglu

        if not self.streams_paired(x):
            raise ValueError("linear_swiglu: this weight does not stream these activations (streams_paired)")
        h, amax = w4a8_gemv_swiglu(x.reshape(-1, x.shape[-1]), self.qdata, self.scale, bias, self.group_size,
                                   norm=norm)
        return h.view(*x.shape[:-1], h.shape[-1]), amax

    def linear_rope_cache(self, x: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
                          sin: torch.Tensor, pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, n_q: int,
                          n_k: int, norm: NormIn | None = None) -> torch.Tensor:
        """x (B, T, K) decode tokens -> the rotated q (B, T, n_q, D) where streams_paired(x): this
        [q; k; v] projection, RoPE on q and k (cos / sin (T, D) rows of the positions pos (T,)) and
        the write of k and v into the static caches kc / vc (B, n_k, S, D) at pos, from one kernel;
        the same values as rope.rope_cache_update(linear(x), ...). norm: as for linear_swiglu."""
        from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_rope_cache

        if x.dim() != 3 or not self.streams_paired(x):
            raise ValueError("linear_rope_cache: this weight does not stream these activations (B, T, K) "
                             "(streams_paired)")
        return w4a8_gemv_rope_cache(x.reshape(-1, x.shape[-1]), self.qdata, self.scale, bias, self.group_size,
                                    cos, sin, pos, kc, vc, n_q, n_k, x.shape[1], norm=norm)

    def linear_prequantized(self, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None,
                            out_dtype: torch.dtype) -> torch.Tensor:
        """q (M, K) int8 per-token quantized activations, s (M, 1) fp32 -> (M, N) out_dtype, on the
        kernel the same call with unquantized activations would run after act_quant."""
        from lowbit.kernels.w4a8.op import _w4a8_linear_q_impl

        if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] != self.shape[1] or s.shape != (q.shape[0], 1):
            raise ValueError(f"linear_prequantized: q must be (M, {self.shape[1]}) int8 and s (M, 1), got "
                             f"{tuple(q.shape)} {q.dtype} and {tuple(s.shape)}")
        if self.zero_point is not None:
            raise ValueError("linear_prequantized: the W4A8 kernels take symmetric int4 weights "
                             "(no zero point)")
        return _w4a8_linear_q_impl(q, s, self.qdata, self.scale, bias, self.group_size, out_dtype, "auto")


def w4a8_linear_reference(x2: torch.Tensor, w: Int4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Pure-torch W4A8: per-token int8 quantization, exact integer group dots, float epilogue."""
    qx, sx = quantize_per_token_sym(x2, INT8_SYM)
    return w4a8_from_quantized_reference(qx, sx, w, bias, x2.dtype)


def w4a8_from_quantized_reference(qx: torch.Tensor, sx: torch.Tensor, w: Int4Tensor,
                                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    g = w.group_size
    acc = int_group_dot(qx, w.int_data(), g, 8)  # (G, M, N) exact
    scale = w.scale.to(torch.float32).t().unsqueeze(1)  # (G, 1, N)
    y = acc.to(torch.float32) * scale
    corr = w.zero_correction()
    if corr is not None:
        rowsum = qx.to(torch.float32).reshape(qx.shape[0], -1, g).sum(-1)  # (M, G)
        y = y + rowsum.t().unsqueeze(-1) * corr.t().unsqueeze(1)
    y = y.sum(0) * sx
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


__all__ = ["Int4Tensor", "w4a8_linear_reference"]
