"""A compact Llama decoder: RMSNorm, RoPE (with Llama-3 scaling), GQA attention over a static
KV cache, SwiGLU feed-forward.

Two fusions keep decode cheap without changing numerics: q/k/v are one linear (`wqkv`) and
gate/up are one linear (`w13`). Every lowbit weight format scales per output row (or per
row-group), and the activation quantization is per token, so quantizing the fused weight
gives exactly the same numbers as quantizing the three (two) weights one by one.

Three call modes of `Transformer.forward`:
  * `input_pos=None`: no cache, causal attention over `tokens` (perplexity windows);
  * `prefill=True`: positions `input_pos` = 0..T-1, writes the cache, causal attention over
    the new keys only (flash attention on CUDA);
  * otherwise (decode): writes the cache at `input_pos`, attends to the whole cache with a
    position mask; static shapes, so the step compiles into one CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.llm import fastpath
from lowbit.llm.config import ModelArgs, RopeKind


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32, scaled as the checkpoint asks."""
    d = args.head_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d
    inv = 1.0 / (args.rope_theta**exponent)
    sc = args.rope_scaling
    if sc is None:
        return inv
    if sc.kind is RopeKind.LINEAR:
        return inv / sc.factor
    # Llama-3.1: wavelengths longer than the original context / low_freq_factor are slowed by
    # `factor`; shorter than original / high_freq_factor stay; the band between interpolates.
    old = sc.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    slowed = torch.where(wavelen > old / sc.low_freq_factor, inv / sc.factor, inv)
    ramp = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - ramp) * slowed / sc.factor + ramp * slowed
    in_band = (wavelen >= old / sc.high_freq_factor) & (wavelen <= old / sc.low_freq_factor)
    return torch.where(in_band, blended, slowed)


def rope_tables(args: ModelArgs, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim), float32, in the rotate-half layout of HF Llama."""
    inv = rope_inv_freq(args)
    pos = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (T, D) already in x's dtype."""
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fastpath.rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        # Normalise in float32, scale in the model dtype (the order HF Llama uses).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache(nn.Module):
    """Static (B, n_kv_heads, max_seq_len, head_dim) key and value buffers, written in place."""

    k: torch.Tensor
    v: torch.Tensor

    def __init__(
        self, batch: int, n_kv: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        shape = (batch, n_kv, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def masked_cache_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, input_pos: torch.Tensor
                           ) -> torch.Tensor:
    """q (B, H, T, D) at positions input_pos over the whole static cache (B, KV, S, D), later
    positions masked: SDPA with a boolean mask (reads every cache position)."""
    b, h, t, d = q.shape
    n_kv = kc.shape[1]
    n_rep = h // n_kv
    mask = torch.arange(kc.shape[2], device=q.device) <= input_pos.view(-1, 1)  # (T, S)
    if n_rep > 1:
        # GQA without copying the cache: the n_rep query heads sharing one kv head become
        # n_rep * T query rows of that head (row r * T + t keeps token t's mask row).
        q = q.reshape(b, n_kv, n_rep * t, d)
        mask = mask.repeat(n_rep, 1)
    y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
    return y.view(b, h, t, d)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, args.q_dim + 2 * args.kv_dim, bias=False)
        self.wo = nn.Linear(args.q_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        prefill: bool,
    ) -> torch.Tensor:
        return self.attend(self.wqkv(x), cos, sin, input_pos, prefill)

    def attend(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        prefill: bool,
    ) -> torch.Tensor:
        """Attention from the fused q/k/v projection output (B, T, (H + 2 KV) * D)."""
        b, t, _ = qkv.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        q = None
        if input_pos is not None and not prefill and self.kv_cache is not None:
            # decode: one kernel rotates q and k and writes k and v into the cache (None: eager ops)
            kc, vc = self.kv_cache.k, self.kv_cache.v
            q = fastpath.rope_cache(qkv, h, kv, d, cos, sin, input_pos, kc, vc)
        if q is not None and input_pos is not None:
            y = self._attend_cache(q, kc, vc, input_pos)
        else:
            y = self._rope_and_attend(qkv, cos, sin, input_pos, prefill)
        return self.wo(y.transpose(1, 2).reshape(b, t, h * d))

    def attend_rotated(self, q: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Attention of decode tokens whose rotated q (B, H, T, D) is given and whose k and v are
        already in the cache (fastpath.add_norm_qkv_rope)."""
        if self.kv_cache is None:
            raise RuntimeError("call Transformer.setup_caches(batch, max_seq_len) before prefill/decode")
        b, _, t, _ = q.shape
        y = self._attend_cache(q, self.kv_cache.k, self.kv_cache.v, input_pos)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _rope_and_attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         input_pos: torch.Tensor | None, prefill: bool) -> torch.Tensor:
        """RoPE, the cache write and attention as separate steps -> (B, H, T, D)."""
        b, t, _ = qkv.shape
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        q, k, v = qkv.split([h * d, kv * d, kv * d], dim=-1)
        v = v.view(b, t, kv, d).transpose(1, 2)
        rotated = fastpath.rope_qk(qkv, h, kv, d, cos, sin)
        if rotated is not None:
            q, k = rotated
        else:
            q = apply_rope(q.view(b, t, h, d).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(b, t, kv, d).transpose(1, 2), cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("call Transformer.setup_caches(batch, max_seq_len) before prefill/decode")
            kc, vc = self.kv_cache.update(input_pos, k, v)
        if input_pos is None or prefill:
            if h != kv:
                # Expanding only the prompt's keys/values keeps prefill on the flash kernel
                # (head i reads kv head i // n_rep, as in HF's repeat_kv).
                k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._attend_cache(q, kc, vc, input_pos)

    def _attend_cache(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, input_pos: torch.Tensor
    ) -> torch.Tensor:
        if q.shape[2] == 1:
            y = fastpath.decode_attention(q, kc, vc, input_pos)
            if y is not None:
                return y
        return masked_cache_attention(q, kc, vc, input_pos)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)  # [gate; up]
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fastpath.swiglu_linear(self.w2, self.w13(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        prefill: bool,
    ) -> torch.Tensor:
        h, out = self.step(x, None, cos, sin, input_pos, prefill)
        return h + out

    def step(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        prefill: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream x + delta (delta: the previous block's output, not yet
        added): returns (h, out) with this block's result h + out. Each residual add is folded into
        the norm after it (fastpath.add_norm_linear), so on the eager CUDA path the adds cost no
        launch; linear(norm(.)) and w2(swiglu(.)) run fused kernels there (W4A8 activations
        quantized inside the norm / SwiGLU kernel). Compiled graphs see the plain ops."""
        att, ffn = self.attention, self.feed_forward
        cache = att.kv_cache
        if input_pos is not None and not prefill and cache is not None:
            # decode: W4A8 [q; k; v] GEMVs rotate q and k and write the cache in their epilogue
            x, out, rotated = fastpath.add_norm_qkv_rope(self.attention_norm, att.wqkv, x, delta, att.n_heads,
                                                         att.n_kv, att.head_dim, cos, sin, input_pos, cache.k,
                                                         cache.v)
        else:
            (x, out), rotated = fastpath.add_norm_linear(self.attention_norm, att.wqkv, x, delta), False
        if rotated and input_pos is not None:
            a = att.attend_rotated(out, input_pos)
        else:
            a = att.attend(out, cos, sin, input_pos, prefill)
        return fastpath.add_norm_mlp(self.ffn_norm, ffn.w13, ffn.w2, x, a)


class Transformer(nn.Module):
    """The decoder. Its weights are placeholders: build it with lowbit.llm.build_model/load_model,
    which construct it on the meta device and stream real (quantized) weights in."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # _weight skips nn.Embedding's normal_ init: the loaders always supply the weights, and
        # normal_ on the meta device costs seconds (it routes through torch._refs -> torch._dynamo).
        self.tok_embeddings = nn.Embedding(
            args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim)
        )
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.cache_batch = 0
        self.cache_len = 0
        self.cache_version = 0  # bumped whenever the KV caches or RoPE tables are replaced (graphs go stale)
        self.rope_len = 0
        self.quantizer_label = "none"

    def blocks(self) -> list[Block]:
        return [b for b in self.layers if isinstance(b, Block)]

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def ensure_rope(self, length: int) -> None:
        """RoPE tables for positions < length (non-persistent buffers: not part of the model size)."""
        if length <= self.rope_len:
            return
        cos, sin = rope_tables(self.args, length, self.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.rope_len = length
        self.cache_version += 1  # captured graphs read the old tables

    def setup_caches(self, batch: int, max_seq_len: int) -> None:
        """(Re)allocate the static KV caches; frees the previous ones first."""
        if batch <= 0 or max_seq_len <= 0:
            raise ValueError(f"setup_caches: batch={batch} and max_seq_len={max_seq_len} must be > 0")
        self.free_caches()
        for layer in self.blocks():
            att = layer.attention  # n_kv: this rank's kv heads under tensor parallelism
            att.kv_cache = KVCache(batch, att.n_kv, max_seq_len, att.head_dim, self.dtype, self.device)
        self.cache_batch, self.cache_len = batch, max_seq_len
        self.ensure_rope(max_seq_len)

    def free_caches(self) -> None:
        for layer in self.blocks():
            layer.attention.kv_cache = None
        self.cache_batch = self.cache_len = 0
        self.cache_version += 1

    def hidden_states(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        prefill: bool = False,
        last_only: bool = False,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim); (B, 1, dim) of the last position with last_only,
        or of position select[0] with select (a (1,) int64 device tensor: the last real token of a
        right-padded prompt, chosen without a host sync)."""
        if input_pos is not None and tokens.shape[0] != self.cache_batch:
            raise ValueError(f"batch {tokens.shape[0]} != KV cache batch {self.cache_batch}")
        x = self.tok_embeddings(tokens)
        if input_pos is None:
            self.ensure_rope(tokens.shape[1])
            cos, sin = self.rope_cos[: tokens.shape[1]], self.rope_sin[: tokens.shape[1]]
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        delta: torch.Tensor | None = None
        for layer in self.layers:
            if isinstance(layer, Block):
                x, delta = layer.step(x, delta, cos, sin, input_pos, prefill)
            else:  # a replaced block: plain residual stream
                x = layer(x if delta is None else x + delta, cos, sin, input_pos, prefill)
                delta = None
        if select is not None:  # the norm (and the pending residual add) is per token
            sel = select.reshape(1)
            return fastpath.add_norm(self.norm, x.index_select(1, sel),
                                     None if delta is None else delta.index_select(1, sel))
        if last_only:
            return fastpath.add_norm(self.norm, x[:, -1:], None if delta is None else delta[:, -1:])
        return fastpath.add_norm(self.norm, x, delta)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        prefill: bool = False,
        last_only: bool = False,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in the model dtype; (B, 1, vocab) with last_only or select."""
        h = self.hidden_states(tokens, input_pos, prefill=prefill, last_only=last_only, select=select)
        return self.output(h)
