"""A Llama decode layer's W4A8 linears at 1-4 tokens with the layer's small ops folded in.

Unfused, one decode layer is eleven kernels: RMSNorm, qkv GEMV, RoPE + cache write,
attention, o GEMV, residual add + RMSNorm, gate/up GEMV, SwiGLU + quantization (three kernels
under Inductor) and the down GEMV. At one token each of the small kernels costs 1.3-2.8 us plus
a launch gap (results/profile_decode_w4a8_b1_h100.txt), about a quarter of the step. Here the
four GEMVs absorb them:

    qkv   = stream GEMV, RMSNorm in its prologue        (each program reads the whole row anyway)
    h     = x + o-proj(attn)                            (residual add in the epilogue)
    hm    = SwiGLU(gate/up GEMV(RMSNorm(h)))            (one program holds matching gate and up rows)
            + per-program max |hm| per token
    out   = h + down(hm)                                (K-chunked GEMV; the token scale is the max of
                                                         those partial maxima, so it quantizes each
                                                         chunk on the fly with act_quant's integers)

Roundings follow the unfused model: RMSNorm normalises in float32 and scales in the model dtype,
the linear outputs are rounded to the model dtype before the residual add / SwiGLU, and the
down projection's int8 activations are exactly act_quant(hm). Only the RMSNorm's float32 sum of
squares is accumulated in a different order than torch's.
"""

from __future__ import annotations

from typing import Optional

import torch

from lowbit.kernels.w4a8.reference import act_quant_ref, int8_gemm_ref, unpack_ref


def _check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> int:
    from lowbit.kernels.w4a8.gemv_dp4a import DP4A_MAX_M

    if x.dim() != 2 or x.shape[0] > DP4A_MAX_M or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"decode GEMV: x must be (M <= {DP4A_MAX_M}, K) fp16/bf16, got {tuple(x.shape)} "
                         f"{x.dtype}")
    k = x.shape[1]
    if packed.dim() != 2 or packed.shape[1] * 2 != k or packed.dtype != torch.uint8:
        raise ValueError(f"decode GEMV: packed must be (N, {k // 2}) uint8, got {tuple(packed.shape)} "
                         f"{packed.dtype}")
    g = min(group_size, k)
    if k % g or scale.shape != (packed.shape[0], k // g):
        raise ValueError(f"decode GEMV: K={k}, group_size={group_size}: scale must be "
                         f"({packed.shape[0]}, {k // g if k % g == 0 else '?'}), got {tuple(scale.shape)}")
    return k


def decode_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,  # noqa: UP045 (op schema)
                residual: Optional[torch.Tensor] = None, amax: Optional[torch.Tensor] = None,  # noqa: UP045
                swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """W4A8 y = x @ W^T (x quantized per token to int8) for M <= 4 tokens, with the optional
    decode-layer fusions (module docstring):

    norm_weight  x is the residual stream; the linear takes RMSNorm(x) * norm_weight (eps)
    swiglu       packed holds [gate; up] (2F rows): y = silu(gate) * up (M, F), and the second
                 output is (M, P) partial maxima of |y| (for the next call's amax)
    amax         (M, P) partial maxima of |x| from a swiglu call: x is quantized with their max
    residual     y = residual + linear (M, N)

    Returns (y, partial maxima) -- the second is an empty (M, 0) tensor unless swiglu.
    """
    from lowbit.kernels.w4a8.gemv_dp4a import dp4a_unsupported, stream_supported
    from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_amax
    from lowbit.kernels.w4a8.gemv_stream import stream

    k = _check(x, packed, scale, group_size)
    m = x.shape[0]
    if swiglu and packed.shape[0] % 2:
        raise ValueError(f"decode GEMV: swiglu needs [gate; up] rows (an even count), got {packed.shape[0]}")
    n = packed.shape[0] // 2 if swiglu else packed.shape[0]
    if norm_weight is not None and (norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"decode GEMV: norm_weight must be ({k},) {x.dtype}, got {tuple(norm_weight.shape)} "
                         f"{norm_weight.dtype}")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype):
        raise ValueError(f"decode GEMV: residual must be ({m}, {n}) {x.dtype}, got {tuple(residual.shape)} "
                         f"{residual.dtype}")
    empty = torch.empty((m, 0), dtype=torch.float32, device=x.device)
    if amax is not None:
        if norm_weight is not None or swiglu:
            raise ValueError("decode GEMV: amax (pre-computed activation maxima) excludes norm_weight/swiglu")
        return w4a8_gemv_amax(x, amax, packed, scale, group_size, residual), empty
    group = 0 if group_size >= k else group_size
    reason = dp4a_unsupported(k, group_size)
    if reason is None and not stream_supported(m, k, group):
        reason = f"K={k} does not fit the streaming GEMV"
    if reason:
        raise ValueError(f"decode GEMV: {reason}")
    x = x.contiguous()
    words = packed.contiguous().view(torch.int32)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res = residual.contiguous() if residual is not None else None
    y, part = stream(x, words, scale, None, out, group, None, norm_weight=norm_weight, eps=float(eps),
                     residual=res, swiglu=swiglu)
    return y, part if part is not None else empty


decode_gemv_op = torch.library.custom_op("lowbit::w4a8_decode_gemv", mutates_args=())(decode_gemv)


@decode_gemv_op.register_fake
def _(x, packed, scale, group_size, norm_weight=None, eps=0.0, residual=None, amax=None, swiglu=False):
    from lowbit.kernels.w4a8.gemv_dp4a import num_sms
    from lowbit.kernels.w4a8.gemv_stream import stream_config

    m, k = x.shape
    n = packed.shape[0] // 2 if swiglu else packed.shape[0]
    p = 0
    if swiglu:  # the stream launcher's grid
        cfg = stream_config(m, n, k)
        sms = num_sms(x.device.index or 0) if x.device.type == "cuda" else 4
        p = min(-(-n // cfg["BLOCK_N"]), sms * cfg["PPS"])
    return x.new_empty((m, n)), x.new_empty((m, p), dtype=torch.float32)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm: normalise in float32, scale in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def decode_gemv_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int,
                    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                    residual: torch.Tensor | None = None, amax: torch.Tensor | None = None,
                    swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_gemv in plain torch; the second output is the full max |y| per token (M, 1) when
    swiglu (the kernel returns partial maxima whose max is this), else (M, 0)."""
    dt = x.dtype
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    qa, sa = act_quant_ref(x)
    full = x.abs().float().amax(-1, keepdim=True)
    if amax is not None and not torch.equal(amax.amax(-1, keepdim=True), full):
        raise ValueError("amax does not hold x's per-token absmax")
    k = x.shape[1]
    y = int8_gemm_ref(qa, sa, unpack_ref(packed), scale, None, min(group_size, k), dt)
    part = torch.empty((x.shape[0], 0), dtype=torch.float32, device=x.device)
    if swiglu:
        g, u = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(g) * u
        part = y.abs().float().amax(-1, keepdim=True)
    if residual is not None:
        y = residual + y
    return y, part


__all__ = ["decode_gemv", "decode_gemv_op", "decode_gemv_ref", "rms_norm_ref"]
