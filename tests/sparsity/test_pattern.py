"""2:4 pruning, pattern checks and the stored compressed layout (values + 2-bit positions)."""

from __future__ import annotations

import pytest
import torch

from lowbit.sparsity import backends
from lowbit.sparsity.pattern import (
    compress_24,
    count_24_violations,
    decompress_24,
    is_24,
    mask_24,
    prune_24,
)


def _prune_loop(w: torch.Tensor) -> torch.Tensor:
    """Independent reference: per group, keep the two largest |w| (ties: lower position)."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            grp = [(abs(float(w[r, g + i])), -i) for i in range(4)]
            keep = sorted(range(4), key=lambda i: grp[i], reverse=True)[:2]
            for i in keep:
                out[r, g + i] = w[r, g + i]
    return out


def test_prune_keeps_two_largest_per_group_of_four():
    w = torch.randn(6, 32)
    w[0, :4] = torch.tensor([1.0, -1.0, 1.0, 0.5])  # ties: the lower positions win
    p = prune_24(w)
    assert torch.equal(p, _prune_loop(w))
    assert torch.equal(p[0, :4], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert is_24(p) and not is_24(w)
    assert torch.equal(mask_24(w), p != 0)
    assert count_24_violations(w) == (6 * 8, 6 * 8)


def test_prune_is_idempotent_and_keeps_2_4_weights_as_they_are():
    w = prune_24(torch.randn(8, 64))
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # fewer than 2 non-zeros: still 2:4
    assert torch.equal(prune_24(w), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_compress_decompress_round_trip(dtype):
    w = torch.randn(16, 64) * 50
    w = prune_24(w.to(dtype) if dtype != torch.int8 else w.round().clamp(-128, 127).to(dtype))
    w[0, :8] = torch.tensor([0, 0, 0, 0, 0, 0, 0, -128 if dtype == torch.int8 else 7]).to(dtype)
    values, meta = compress_24(w)
    assert values.shape == (16, 32) and values.dtype == dtype
    assert meta.shape == (16, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), w)


def test_meta_byte_layout():
    # Row [a 0 b 0 | 0 c 0 d]: group 0 keeps positions (0, 2) -> nibble 0b1000, group 1 keeps
    # (1, 3) -> 0b1101; group 0 is the low nibble.
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    values, meta = compress_24(w)
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert meta.tolist() == [[0xD8]]


def test_bad_shapes_get_clear_errors():
    with pytest.raises(ValueError, match="K divisible by 4, got K=6"):
        prune_24(torch.randn(2, 6))
    with pytest.raises(ValueError, match="K must be divisible by 8, got K=12"):
        compress_24(torch.randn(2, 12))
    with pytest.raises(ValueError, match="2-D weight"):
        prune_24(torch.randn(2, 3, 8))


def test_cutlass_preparation_round_trips_on_cpu():
    """The CUTLASS runtime form (torch's own converter, also usable on CPU) holds our weight."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    for dtype in (torch.bfloat16, torch.int8):
        w = prune_24(torch.randn(32, 128).mul(20).to(dtype))
        values, meta = backends.pack_for(backends.CUTLASS, w)
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), w)
