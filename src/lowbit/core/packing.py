"""int4 nibble packing along K.

Nibble order: byte j of a row holds element k = 2j in the LOW nibble and
k = 2j + 1 in the HIGH nibble, both as two's-complement 4-bit values:

    K index:  0    1    2    3   ...
    byte:    [ 1 | 0 ][ 3 | 2 ] ...      (high | low)

So `packed = (q[..., 0::2] & 0xF) | (q[..., 1::2] << 4)` and a signed unpack is
`lo = (p << 4) >> 4`, `hi = p >> 4` on int8 (arithmetic shifts).
"""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) int8 values in [-8, 7] -> (..., K // 2) uint8."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got K={q.shape[-1]}")
    # The range check reads values (a data-dependent branch torch.compile cannot trace);
    # under compile it is skipped: callers pass quantize()'s already-clamped output.
    if q.numel() and not torch.compiler.is_compiling() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    lo = q[..., 0::2].to(torch.int16) & 0xF
    hi = (q[..., 1::2].to(torch.int16) & 0xF) << 4
    return (lo | hi).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K // 2) uint8 -> (..., K) int8 in [-8, 7]; exact inverse of pack_int4."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got {packed.dtype}")
    p = packed.view(torch.int8)
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4)
    hi = torch.bitwise_right_shift(p, 4)
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
