"""Fake-quantized linear layers: the exact quantized forward, straight-through backward.

The forward does not imitate the quantized model, it *is* the quantized model:
it quantizes the current weight with the base config's own `quantize_weight`
(same rounding, clamping, zero-point domain, granularity and ScaleSearch as
post-training quantization) and runs that tensor's `_linear`, the function a
converted model runs. So `convert` reproduces the trained model's outputs bit
for bit on the reference path.

The backward treats quantization as the identity where nothing was clamped
(clipped straight-through estimator):
  grad_x = g @ w_hat            activation quantization passes straight through
  grad_w = (g^T @ x_hat) * inside
with x_hat the fake-quantized activation the quantized GEMM consumed (x itself for
weight-only formats). With learnable quantization parameters the scale (and zero
point) get the LSQ gradients, see `qparams.ste_terms`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.core.primitives import quantize_per_token_sym
from lowbit.core.qtype import ZeroPointDomain, qtype_by_name
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.common import ActQuant, uses_act_quant
from lowbit.formats.configs import QuantConfig
from lowbit.formats.float8 import Float8Tensor
from lowbit.qat.qparams import (
    QSpec,
    expand_blocks,
    initial_qparams,
    ste_terms,
    sum_blocks,
    zero_point_domain,
)


def quantized_weight(
    config: QuantConfig, spec: QSpec, w: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None
) -> QuantizedTensor:
    """The quantized tensor a layer serves: PTQ of `w`, or `w` under learned qparams."""
    if scale is None:
        return config.quantize_weight(w)
    return spec.build(w, scale, zero)


def fake_quant_activation(q: QuantizedTensor, act: ActQuant | None, x2: torch.Tensor) -> torch.Tensor:
    """The dequantized activation that `q._linear` multiplies (x2 itself if it keeps x in
    high precision), in float32. `act` is `q.act_quant`, passed in from the layer's QSpec:
    torch.compile cannot read that attribute off a weight built inside the graph."""
    if act is None or not uses_act_quant(act, x2):
        return x2.to(torch.float32)
    if isinstance(q, Float8Tensor):
        qx, sx = q._quantize_act(x2)
    else:  # int8 / int4 weights quantize activations per token, symmetric
        qx, sx = quantize_per_token_sym(x2, qtype_by_name(act.qtype))
    return qx.to(torch.float32) * sx


class _FakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor | None,
        zero: torch.Tensor | None,
        config: QuantConfig,
        spec: QSpec,
    ) -> torch.Tensor:
        w = weight.detach()
        q: Any = quantized_weight(
            config,
            spec,
            w,
            None if scale is None else scale.detach(),
            None if zero is None else zero.detach(),
        )
        out = q._linear(x.detach(), None if bias is None else bias.detach())
        w_hat, inside, s_blocks, z_blocks = ste_terms(w, q)
        x_hat = fake_quant_activation(q, spec.act_quant, x.detach().reshape(-1, x.shape[-1]))
        ctx.save_for_backward(x_hat, w, w_hat, inside, s_blocks, z_blocks)
        ctx.meta = (
            x.shape,
            x.dtype,
            weight.dtype,
            None if bias is None else bias.dtype,
            tuple(q.block_size),
            zero_point_domain(q),
        )
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        x_hat, w, w_hat, inside, s_blocks, z_blocks = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, b_dtype, block, domain = ctx.meta
        need_x, need_w, need_b, need_s, need_z = ctx.needs_input_grad[:5]
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_w = grad_b = grad_s = grad_z = None
        if need_x:
            grad_x = (g2 @ w_hat.to(g2.dtype)).to(x_dtype).reshape(x_shape)
        if need_b:
            grad_b = g2.sum(0).to(b_dtype)
        if need_s or need_z:
            s_full = expand_blocks(s_blocks, block)
        if need_w or need_s or need_z:
            gw_hat = g2.to(torch.float32).t() @ x_hat  # dL / d w_hat, float32 (N, K)
            if need_w:
                grad_w = torch.where(inside, gw_hat, 0.0).to(w_dtype)
            if need_s:
                # inside: (w_hat - w) / s; clamped: (w_hat - z) / s, z = 0 but in the FLOAT domain
                z = 0.0 if z_blocks is None else expand_blocks(z_blocks, block)
                offset = torch.where(inside, w.to(torch.float32), z)
                grad_s = sum_blocks(gw_hat * (w_hat - offset) / s_full, block)
            if need_z:
                outside = torch.where(inside, 0.0, gw_hat)
                if domain is ZeroPointDomain.INT:  # w_hat = (q - zp) * s, zp rounded straight through
                    outside = -outside * s_full
                grad_z = sum_blocks(outside, block)
        return grad_x, grad_w, grad_b, grad_s, grad_z, None, None


class FakeQuantizedLinear(nn.Linear):
    """An nn.Linear whose forward is the quantized linear of `base_config`, trainable.

    It shares the weight and bias Parameters of the layer it replaced, so an optimizer
    built before `prepare` keeps training them. With `learnable_qparams`, `weight_scale`
    (and `weight_zero_point` where the format has one) are Parameters too, initialised to
    the post-training choice.
    """

    weight_scale: nn.Parameter | None
    weight_zero_point: nn.Parameter | None

    def __init__(self, linear: nn.Linear, base_config: QuantConfig, learnable_qparams: bool = False) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.train(linear.training)
        self.base_config = base_config
        with torch.no_grad():  # the format's layout, and the initial qparams for range learning
            q = base_config.quantize_weight(linear.weight.detach())
        self.qspec = QSpec.of(q)
        self.weight_scale = None
        self.weight_zero_point = None
        if learnable_qparams:
            scale, zero = initial_qparams(q)
            self.weight_scale = nn.Parameter(scale)
            if zero is not None and zero_point_domain(q) is not ZeroPointDomain.NONE:
                self.weight_zero_point = nn.Parameter(zero)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, base_config: QuantConfig, learnable_qparams: bool = False
    ) -> "FakeQuantizedLinear":
        return cls(linear, base_config, learnable_qparams)

    @property
    def learnable_qparams(self) -> bool:
        return self.weight_scale is not None

    def quantized_weight(self) -> QuantizedTensor:
        """The quantized weight `convert` installs (no autograd)."""
        with torch.no_grad():
            scale = None if self.weight_scale is None else self.weight_scale.detach()
            zero = None if self.weight_zero_point is None else self.weight_zero_point.detach()
            return quantized_weight(self.base_config, self.qspec, self.weight.detach(), scale, zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FakeQuantLinear.apply(
            x, self.weight, self.bias, self.weight_scale, self.weight_zero_point, self.base_config, self.qspec
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, base_config={type(self.base_config).__name__}, "
            f"learnable_qparams={self.learnable_qparams}"
        )
