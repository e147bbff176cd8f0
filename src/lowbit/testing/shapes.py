"""Real linear-layer shapes (N, K) = (out_features, in_features) of popular LLMs.

Used by benchmarks (and tests that want real shapes). Fused entries are what
serving stacks run as one GEMM: qkv = q, k and v stacked along N; gate_up =
gate and up stacked along N.
"""

from __future__ import annotations


def _llama(hidden: int, intermediate: int, kv_dim: int) -> dict[str, tuple[int, int]]:
    """Linears of one Llama decoder block; kv_dim = n_kv_heads * head_dim."""
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv_dim, hidden),
        "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, hidden),
        "qkv_proj": (hidden + 2 * kv_dim, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
        "gate_up_proj": (2 * intermediate, hidden),
    }


MODEL_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    # 32 heads of 128, multi-head attention (kv = hidden).
    "Llama-2-7B": _llama(hidden=4096, intermediate=11008, kv_dim=4096),
    # grouped-query attention: 8 kv heads of 128.
    "Llama-3-8B": _llama(hidden=4096, intermediate=14336, kv_dim=1024),
    "Llama-3-70B": _llama(hidden=8192, intermediate=28672, kv_dim=1024),
}

# Token counts benchmarks sweep: decode (1), small batches, prefill (2048, 8192).
BENCH_M: tuple[int, ...] = (1, 16, 128, 2048, 8192)


def all_shapes() -> list[tuple[int, int]]:
    """Distinct (N, K) over every model, sorted."""
    return sorted({nk for layers in MODEL_SHAPES.values() for nk in layers.values()})
