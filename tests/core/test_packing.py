"""int4 nibble packing: bit-exact round trips, the documented nibble order, clear errors."""

from __future__ import annotations

import pytest
import torch

from lowbit.core.packing import pack_int4, unpack_int4


def test_all_16_values_round_trip_including_extremes():
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 8)
    assert torch.equal(unpack_int4(packed), q)
    for pair in ([-8, 7], [7, -8], [-8, -8], [7, 7], [0, -1], [-1, 0]):
        t = torch.tensor([pair], dtype=torch.int8)
        assert torch.equal(unpack_int4(pack_int4(t)), t)


def test_every_pair_of_values_round_trips():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    lo, hi = torch.meshgrid(vals, vals, indexing="ij")
    q = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=-1)  # (256, 2): all 256 pairs
    packed = pack_int4(q)
    assert packed.unique().numel() == 256  # a bijection onto bytes
    assert torch.equal(unpack_int4(packed), q)


def test_every_byte_round_trips():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    q = unpack_int4(b)
    assert q.dtype == torch.int8 and q.shape == (4, 128)
    assert int(q.min()) == -8 and int(q.max()) == 7
    assert torch.equal(pack_int4(q), b)


def test_nibble_order_low_nibble_holds_even_k():
    # Documented layout: element 2j in the low nibble, 2j + 1 in the high nibble, two's complement.
    q = torch.tensor([[-8, 7, 3, -1]], dtype=torch.int8)
    packed = pack_int4(q).to(torch.int32)
    lo, hi = packed & 0xF, packed >> 4
    assert lo.tolist() == [[(-8) & 0xF, 3]]
    assert hi.tolist() == [[7, (-1) & 0xF]]


@pytest.mark.parametrize("shape", [(1, 2), (7, 130), (3, 5, 64), (33, 4096)], ids=str)
def test_random_round_trip(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), q)


def test_unpack_of_non_contiguous_view():
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed[::2]), q[::2])
    assert torch.equal(pack_int4(q[:, 8:40]), packed[:, 4:20])


@pytest.mark.parametrize("k", [1, 3, 129])
def test_odd_k_raises(k):
    with pytest.raises(ValueError, match=f"even last dim, got K={k}"):
        pack_int4(torch.zeros(2, k, dtype=torch.int8))


@pytest.mark.parametrize("bad", [8, -9, 127, -128])
def test_out_of_range_raises(bad):
    q = torch.zeros(2, 8, dtype=torch.int8)
    q[1, 3] = bad
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(q)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float32])
def test_pack_wrong_dtype_raises(dtype):
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(2, 8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_unpack_wrong_dtype_raises(dtype):
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(2, 8, dtype=dtype))
