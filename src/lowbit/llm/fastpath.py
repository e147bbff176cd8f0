"""Eager-mode fast path of the decoder: fused kernels for RMSNorm, RoPE and SwiGLU, and
W4A8 activations quantized by the kernel that produces them.

Prefill runs eagerly (one call per prompt, any length), and so does the decode step replayed
as a CUDA graph without torch.compile. There, the decoder's small torch ops are each a full pass
over a (tokens x dim) activation (and a launch); lowbit.kernels.fused does each step in one pass
with the same roundings, with every residual add folded into the RMSNorm after it
(add_norm_linear, add_norm). When the next linear is a W4A8 weight that would quantize its input
per token anyway (Int4Tensor.takes_prequantized), RMSNorm and SwiGLU emit the int8 activations
and scales directly and the linear starts at its int8 kernel.

Used when the activation is on CUDA, autograd is off and torch.compile is not tracing (the
compiled decode step keeps the plain norm / SwiGLU ops, which Inductor fuses itself). Two
helpers also run inside compiled graphs, as opaque ops: decode attention and the decode RoPE +
KV-cache write (rope_cache), which Inductor cannot do as well. LOWBIT_FUSED=0 turns
the fast path off; LOWBIT_FUSED=1 also takes it on CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lowbit.kernels import interpreter_enabled, triton_unavailable_reason

_DTYPES = (torch.float16, torch.bfloat16)


def enabled(x: torch.Tensor, in_compiled_graphs: bool = False) -> bool:
    """The fast path's gate. in_compiled_graphs: also while torch.compile traces (kernels the
    graph calls as opaque ops, like decode attention)."""
    mode = os.environ.get("LOWBIT_FUSED", "auto")
    if mode == "0" or x.dtype not in _DTYPES or torch.is_grad_enabled():
        return False
    tracing = torch.compiler.is_compiling() or type(x) is not torch.Tensor
    if tracing and not in_compiled_graphs:
        return False
    if not x.is_cuda and not (mode == "1" and interpreter_enabled()):
        return False
    # (tracing: Inductor itself needs Triton, and Dynamo cannot trace the package lookup)
    return tracing or triton_unavailable_reason(x) is None


def active_weight(linear: nn.Module) -> torch.Tensor | None:
    """The weight F.linear will read: nn.Linear's, or a PhasedLinear's for its current phase."""
    from lowbit.api import FlatQuantizedLinear
    from lowbit.llm.phased import Phase, PhasedLinear

    if isinstance(linear, FlatQuantizedLinear):  # compiled decode flattens the linears; prefill is eager
        return linear.weight
    if isinstance(linear, PhasedLinear):
        return linear.weight_decode if linear.phase is Phase.DECODE else linear.weight_prefill
    if type(linear) is nn.Linear:
        return linear.weight
    return None


def _prequantized_weight(linear: nn.Module, x: torch.Tensor):
    from lowbit.formats.int4 import Int4Tensor

    w = active_weight(linear)
    return w if isinstance(w, Int4Tensor) and w.takes_prequantized(x) else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The fused RMSNorm, or None when the eager module should run."""
    if not enabled(x) or weight.dtype != x.dtype:
        return None
    from lowbit.kernels.fused import rms_norm as kernel

    return kernel(x, weight, eps)


def norm_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(norm(x)); a W4A8 linear gets the int8 activations from the norm kernel."""
    params = _norm_params(norm, x)
    w = _prequantized_weight(linear, x) if params is not None and enabled(x) else None
    if params is None or w is None:
        return linear(norm(x))
    from lowbit.kernels.fused import rms_norm_quant

    q, s = rms_norm_quant(x, *params)
    return w.linear_prequantized(q, s, linear.bias, x.dtype).view(*x.shape[:-1], w.shape[0])


def _norm_params(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    weight, eps = getattr(norm, "weight", None), getattr(norm, "eps", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, (int, float)) or weight.dtype != x.dtype:
        return None
    return weight, float(eps)


def _add_norm_params(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor
                     ) -> tuple[torch.Tensor, float] | None:
    """The norm's (weight, eps) when x + delta and the norm can run as one fused kernel, else None."""
    if not enabled(x) or type(delta) is not torch.Tensor or delta.shape != x.shape or delta.dtype != x.dtype:
        return None
    return _norm_params(norm, x)


def add_norm_linear(norm: nn.Module, linear: nn.Module, x: torch.Tensor, delta: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, linear(norm(h))) with h = x + delta (h = x when delta is None): the residual add folded
    into the norm kernel (and a W4A8 linear's activations quantized there) on the fast path."""
    if delta is None:
        return x, norm_linear(norm, linear, x)
    params = _add_norm_params(norm, x, delta)
    if params is None:
        h = x + delta
        return h, linear(norm(h))
    from lowbit.kernels import fused

    w = _prequantized_weight(linear, x)
    if w is None:
        h, y = fused.add_rms_norm(x, delta, *params)
        return h, linear(y)
    h, q, s = fused.add_rms_norm_quant(x, delta, *params)
    return h, w.linear_prequantized(q, s, linear.bias, x.dtype).view(*x.shape[:-1], w.shape[0])


def add_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """norm(x + delta) (norm(x) when delta is None), the add folded into the norm kernel."""
    return _add_then_norm(norm, x, delta)[1]


def _add_then_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) with h = x + delta (h = x when delta is None), the add folded into the norm
    kernel where it can be (lowbit's RMSNorm module runs the fused kernel itself)."""
    if delta is None:
        return x, norm(x)
    params = _add_norm_params(norm, x, delta)
    if params is None:
        h = x + delta
        return h, norm(h)
    from lowbit.kernels import fused

    return fused.add_rms_norm(x, delta, *params)


def _bias(linear: nn.Module) -> torch.Tensor | None:
    bias = getattr(linear, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _folded_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None):
    """(h, NormIn) when the add + RMSNorm (lowbit's RMSNorm module, weight in x's dtype) before a
    streaming W4A8 GEMV can run in that GEMV's prologue (gemv_dp4a.NormIn: x (B, T, K) and delta as
    rows; h = x + delta is written by the kernel), else None. LOWBIT_STREAM_NORM=0 keeps the
    separate norm kernel."""
    from lowbit.llm.model import RMSNorm

    if os.environ.get("LOWBIT_STREAM_NORM", "1") == "0" or not isinstance(norm, RMSNorm):
        return None
    params = _norm_params(norm, x) if delta is None else _add_norm_params(norm, x, delta)
    if params is None:
        return None
    from lowbit.kernels.w4a8.gemv_dp4a import NormIn

    weight, eps = params
    if weight.shape != (x.shape[-1],):
        return None
    if delta is None:
        return x, NormIn(weight, eps)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous rows, whatever x's strides
    return h, NormIn(weight, eps, delta.reshape(-1, x.shape[-1]), h.view(-1, x.shape[-1]))


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [gate; up] projection output."""
    if enabled(gu):
        from lowbit.kernels.fused import swiglu as kernel

        return kernel(gu)
    gate, up = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_linear(linear: nn.Module, gu: torch.Tensor) -> torch.Tensor:
    """linear(swiglu(gu)); a W4A8 linear gets the int8 activations from the SwiGLU kernel."""
    f = gu.shape[-1] // 2
    w = _prequantized_weight(linear, gu[..., :f]) if enabled(gu) else None
    if w is None:
        return linear(swiglu(gu))
    from lowbit.kernels.fused import swiglu_quant

    q, s = swiglu_quant(gu)
    return w.linear_prequantized(q, s, linear.bias, gu.dtype).view(*gu.shape[:-1], w.shape[0])


def add_norm_mlp(norm: nn.Module, w13: nn.Module, w2: nn.Module, x: torch.Tensor, delta: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w2(swiglu(w13(norm(h))))) with h = x + delta (h = x when delta is None): the feed-forward
    half of a block. On the fast path, a W4A8 [gate; up] weight that streams these few tokens
    (Int4Tensor.streams_paired) applies SwiGLU inside its GEMV and reports each row's absmax, so
    a W4A8 w2 that takes int8 rows gets them from one short quantize launch
    (act_quant_from_amax) instead of a SwiGLU kernel that quantizes (one program per token, as
    it must see the whole row); otherwise add_norm_linear + swiglu_linear."""
    from lowbit.formats.int4 import Int4Tensor

    w = active_weight(w13) if enabled(x) else None
    if not (isinstance(w, Int4Tensor) and w.streams_paired(x)):
        h, gu = add_norm_linear(norm, w13, x, delta)
        return h, swiglu_linear(w2, gu)
    folded = _folded_norm(norm, x, delta)
    if folded is not None:
        h, nin = folded
        act, amax = w.linear_swiglu(x, _bias(w13), norm=nin)
    else:
        h, y = _add_then_norm(norm, x, delta)
        if y.dtype != x.dtype or y.shape != x.shape:  # e.g. a float32 norm weight, a broadcast delta
            return h, swiglu_linear(w2, w13(y))
        act, amax = w.linear_swiglu(y, _bias(w13))
    w2w = _prequantized_weight(w2, act)
    if w2w is None:
        return h, w2(act)
    from lowbit.kernels.w4a8.act_quant import act_quant_from_amax

    q, s = act_quant_from_amax(act.view(-1, act.shape[-1]), amax)
    return h, w2w.linear_prequantized(q, s, w2.bias, x.dtype).view(*x.shape[:-1], w2w.shape[0])


def rope_qk(
    qkv: torch.Tensor, n_q: int, n_k: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rotated q (B, H, T, D) and k (B, KV, T, D) views, or None when the eager ops should run."""
    if not enabled(qkv) or head_dim & (head_dim - 1) or cos.dtype != qkv.dtype or cos.dim() != 2:
        return None
    from lowbit.kernels.rope import rope_qk as kernel

    q, k = kernel(qkv, n_q, n_k, head_dim, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)


def _rope_cache_takes(x: torch.Tensor, head_dim: int, cos: torch.Tensor, kc: torch.Tensor,
                      input_pos: torch.Tensor) -> bool:
    """Whether the RoPE + cache-write kernels take tokens x (B, T, .) of x's dtype."""
    return (x.dim() == 3 and not head_dim & (head_dim - 1) and cos.dtype == x.dtype and cos.dim() == 2
            and kc.dtype == x.dtype and input_pos.dim() == 1 and input_pos.shape[0] == x.shape[1])


def add_norm_qkv_rope(norm: nn.Module, wqkv: nn.Module, x: torch.Tensor, delta: torch.Tensor | None, n_q: int,
                      n_k: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                      kc: torch.Tensor, vc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The attention input of decode tokens x + delta (B, T, dim): (h, q, True) with h = x + delta
    (h = x when delta is None) and the rotated q (B, H, T, D) when one kernel ran the [q; k; v]
    projection of norm(h), RoPE and the KV-cache write of k and v at input_pos (a W4A8 wqkv that
    streams these few tokens, Int4Tensor.linear_rope_cache); otherwise (h, qkv, False) from
    add_norm_linear, for Attention.attend."""
    from lowbit.formats.int4 import Int4Tensor

    w = active_weight(wqkv) if enabled(x) else None
    if not (isinstance(w, Int4Tensor) and _rope_cache_takes(x, head_dim, cos, kc, input_pos)
            and w.streams_paired(x)):
        return (*add_norm_linear(norm, wqkv, x, delta), False)
    folded = _folded_norm(norm, x, delta)
    if folded is not None:
        h, nin = folded
        q = w.linear_rope_cache(x, _bias(wqkv), cos, sin, input_pos, kc, vc, n_q, n_k, norm=nin)
        return h, q.transpose(1, 2), True
    h, y = _add_then_norm(norm, x, delta)
    if y.dtype != x.dtype or y.shape != x.shape:  # e.g. a float32 norm weight, a broadcast delta
        return h, wqkv(y), False
    q = w.linear_rope_cache(y, _bias(wqkv), cos, sin, input_pos, kc, vc, n_q, n_k)
    return h, q.transpose(1, 2), True


def rope_cache(qkv: torch.Tensor, n_q: int, n_k: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
               input_pos: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor | None:
    """Decode: RoPE on q and k and the KV-cache write in one kernel (lowbit.kernels.rope); returns
    the rotated q (B, H, T, D) with k and v written into kc / vc at input_pos, or None when the
    eager ops should run. Like decode_attention it also runs inside torch.compile (opaque op
    lowbit::rope_cache_update, mutating the caches): Inductor otherwise emits three kernels per
    layer for it (q rotation, k rotation + cache write, v cache write)."""
    if not enabled(qkv, in_compiled_graphs=True) or not _rope_cache_takes(qkv, head_dim, cos, kc, input_pos):
        return None
    from lowbit.kernels import rope

    if torch.compiler.is_compiling() or type(qkv) is not torch.Tensor:
        q = rope.rope_cache_update_op(qkv, cos, sin, input_pos, kc, vc, n_q, n_k)
    else:
        q = rope.rope_cache_update(qkv, cos, sin, input_pos, kc, vc, n_q, n_k)
    return q.transpose(1, 2)


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, input_pos: torch.Tensor
                     ) -> torch.Tensor | None:
    """One new token per sequence attending to the static cache's positions 0..input_pos, reading
    only those (lowbit.kernels.attention); None when the masked SDPA should run instead.

    Unlike the other helpers this one also runs inside torch.compile (as the opaque op
    lowbit::decode_attention, so the CUDA-graph'ed decode step gets it): Inductor cannot make
    the masked SDPA skip the unfilled part of the cache.
    """
    if not enabled(q, in_compiled_graphs=True):
        return None
    from lowbit.kernels import attention

    if attention.unsupported(q, kc, vc, input_pos) is not None:
        return None
    if torch.compiler.is_compiling() or type(q) is not torch.Tensor:
        return attention.decode_attention_op(q, kc, vc, input_pos)
    return attention.decode_attention(q, kc, vc, input_pos)


__all__ = ["enabled", "active_weight", "rms_norm", "norm_linear", "swiglu", "swiglu_linear", "add_norm_mlp",
           "rope_qk", "add_norm_qkv_rope", "rope_cache", "decode_attention"]
