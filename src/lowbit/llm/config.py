"""Shapes of a Llama-family decoder: presets for real models and parsing of HF `config.json`.

Llama-2 and Llama-3 differ only in numbers (vocabulary, GQA head counts, RoPE base and
the Llama-3.1 RoPE frequency scaling), so one `ModelArgs` describes both.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any


class RopeKind(str, enum.Enum):
    LINEAR = "linear"  # positions divided by `factor`
    LLAMA3 = "llama3"  # Llama-3.1 band-wise frequency scaling


@dataclass(frozen=True)
class RopeScaling:
    kind: RopeKind = RopeKind.LLAMA3
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", RopeKind(self.kind))
        except ValueError:
            raise ValueError(
                f"RopeScaling.kind={self.kind!r} is invalid; allowed: {[k.value for k in RopeKind]}"
            ) from None
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor={self.factor!r} must be > 0")
        if self.kind is RopeKind.LLAMA3 and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                f"RopeScaling: need high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelArgs.{f}={v!r} must be a positive int")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelArgs: n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"ModelArgs: dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim"
                )
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs.head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_params(self) -> int:
        block = self.dim * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.dim
        block += 3 * self.dim * self.ffn_dim + 2 * self.dim
        emb = self.vocab_size * self.dim
        return self.n_layers * block + self.dim + emb * (1 if self.tie_embeddings else 2)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"]["kind"] = self.rope_scaling.kind.value
        return d


_LLAMA31_ROPE = RopeScaling(RopeKind.LLAMA3, 8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(
        dim=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=384,
        vocab_size=512,
        max_position_embeddings=2048,
        name="tiny",
    ),
    "llama-2-7b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000, name="llama-2-7b"
    ),
    "llama-2-13b": ModelArgs(
        dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, vocab_size=32000, name="llama-2-13b"
    ),
    "llama-3-8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        name="llama-3-8b",
    ),
    "llama-3.1-8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=131072,
        name="llama-3.1-8b",
    ),
    "llama-3-70b": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim=28672,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        name="llama-3-70b",
    ),
}


def preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {sorted(PRESETS)} (or a checkpoint directory)")
    return PRESETS[name]


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older versions write
    # `rope_theta` plus an optional `rope_scaling` dict keyed by "type" or "rope_type".
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(RopeKind.LINEAR, float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            RopeKind.LLAMA3,
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3")


def from_hf_config(cfg: dict[str, Any], name: str = "hf") -> ModelArgs:
    """ModelArgs from a Hugging Face Llama `config.json` dict (ValueError on anything else)."""
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise ValueError(f"config.json model_type={model_type!r}; lowbit.llm loads 'llama' checkpoints")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}; Llama's SwiGLU needs 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"config.json {flag}=true is not supported (Llama linears have no bias)")
    missing = [
        k
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        if k not in cfg
    ]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    theta, scaling = _rope_from_hf(cfg)
    n_heads = int(cfg["num_attention_heads"])
    return ModelArgs(
        dim=int(cfg["hidden_size"]),
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        ffn_dim=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        head_dim=int(cfg.get("head_dim") or 0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        name=name,
    )
