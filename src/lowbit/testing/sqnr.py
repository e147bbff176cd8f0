"""Signal-to-quantization-noise ratio and the per-format floors the tests enforce.

    sqnr_db(ref, out) = 20 * log10(||ref|| / ||ref - out||)      (Frobenius norms)

Every 6 dB is one bit of agreement. The floors are measured on randn data,
x (64 x 4096) @ w (4096 x 4096)^T in float32 with default configs, and sit a few
dB under the measurement so a real regression fails while seed noise does not.
Real weights with outliers score lower: model-level accuracy belongs in
benchmarks, not in these unit-test floors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lowbit.formats.configs import QuantConfig

# Key: config short name (lowbit.config_from_short_name), plus "<name>_<variant>" for
# non-default settings worth a floor of their own. Value: minimum SQNR in dB.
MIN_SQNR_DB: dict[str, float] = {
    "int8wo": 35.0,  # measured 41.3 dB (per-row symmetric int8 weights)
    "int8dq": 35.0,  # measured 38.2 dB (W8A8, per-token int8 activations)
    "fp8wo": 25.0,  # measured 31.5 dB (e4m3 per-row weights)
    "fp8dq": 25.0,  # measured 28.5 dB (e4m3 rowwise: per-token x per-row)
    "fp8dq_tensor": 25.0,  # measured 28.5 dB (e4m3 per-tensor x per-tensor)
    "int4wo": 17.0,  # measured 20.5 dB (g128 asymmetric FLOAT zero, MSE scale search)
    "int4wo_sym": 16.0,  # measured 19.9 dB (g128 symmetric, MSE scale search)
    "w4a8": 16.0,  # measured 19.9 dB (g128 symmetric int4 x per-token int8)
}

# Non-default table keys -> (short name, config kwargs); every other key is a short name.
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp8dq_tensor": ("fp8dq", {"granularity": "tensor"}),
    "int4wo_sym": ("int4wo", {"mapping": "symmetric", "zero_point_domain": "none"}),
}


def config_for(key: str) -> "QuantConfig":
    """The config a MIN_SQNR_DB key was measured with."""
    from lowbit.formats.configs import config_from_short_name

    if key not in MIN_SQNR_DB:
        raise ValueError(f"key={key!r} has no SQNR floor; allowed: {sorted(MIN_SQNR_DB)}")
    name, kwargs = _VARIANTS.get(key, (key, {}))
    return config_from_short_name(name, **kwargs)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """20 log10(|ref| / |ref - out|) in float64; inf when out equals ref exactly."""
    if ref.shape != out.shape:
        raise ValueError(f"sqnr_db: shapes differ, ref {tuple(ref.shape)} vs out {tuple(out.shape)}")
    ref64 = ref.detach().to(torch.float64)
    noise = float((ref64 - out.detach().to(torch.float64)).norm())
    signal = float(ref64.norm())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


def measure_floors(m: int = 64, k: int = 4096, n: int = 4096, seed: int = 0) -> dict[str, float]:
    """SQNR of every MIN_SQNR_DB entry on randn x (m, k) @ w (n, k)^T in float32: how the
    table's comment values were measured:
    `python -c "from lowbit.testing import measure_floors; print(measure_floors())"`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    ref = x @ w.t()
    return {
        key: sqnr_db(ref, torch.nn.functional.linear(x, config_for(key).quantize_weight(w)))
        for key in MIN_SQNR_DB
    }
