"""Decode attention over a static KV cache (lowbit.kernels.attention) vs the masked SDPA.

CPU: Triton's interpreter (conftest) at small shapes; on a GPU also Llama shapes.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels.attention import (
    BLOCK_S,
    decode_attention,
    decode_attention_op,
    decode_attention_ref,
    num_splits,
    unsupported,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"
# NOTE: Triton's interpreter computes bf16 tl.dot wrongly (a 16x16 bf16 dot is off by 1e10 on
# CPU), so bf16 runs on the GPU only, as in the other kernel tests.
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]

# (batch, query heads, kv heads, cache length, head_dim, pos, splits: None = num_splits' rule)
SMALL = [
    (3, 6, 2, 64, 16, 10, None),  # one split (written directly), G = 3 query heads per kv head
    (2, 4, 4, 80, 32, 0, 2),      # only position 0 filled; 2 splits, the second empty
    (2, 4, 4, 80, 32, 79, None),  # cache full, last block partial
    (1, 8, 2, 200, 64, 130, 4),   # 4 splits, GQA G = 4
]
BIG = [(1, 32, 32, 4096, 128, 3000, None), (16, 32, 32, 160, 128, 100, None),
       (4, 32, 8, 8192, 128, 8191, None), (1, 32, 32, 160, 128, 159, 2)]


def _case(b, h, kv, s, d, pos, dtype):
    q = torch.randn(b, 1, h, d, device=DEV, dtype=dtype).transpose(1, 2)  # (B, H, 1, D), strided
    k = torch.randn(b, kv, s, d, device=DEV, dtype=dtype)
    v = torch.randn(b, kv, s, d, device=DEV, dtype=dtype)
    # past pos the cache holds NaN: any read of it would poison the output
    k[:, :, pos + 1:] = float("nan")
    v[:, :, pos + 1:] = float("nan")
    return q, k, v, torch.tensor([pos], device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SMALL + (BIG if ON_GPU else []))
def test_matches_masked_sdpa(shape, dtype):
    q, k, v, pos = _case(*shape[:-1], dtype)
    got = decode_attention(q, k, v, pos, splits=shape[-1])
    assert got.shape == q.shape and got.dtype == dtype and torch.isfinite(got).all()
    ref = decode_attention_ref(q, k.nan_to_num(), v.nan_to_num(), pos)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_num_splits():
    assert num_splits(programs=512, length=160) == 1  # batch 16 x 32 heads fill the GPU
    assert num_splits(programs=32, length=160) == 1  # < 2 x MIN_SPLIT_LEN positions: no split
    assert num_splits(programs=32, length=1024) == 4  # capped by 1024 // MIN_SPLIT_LEN
    assert num_splits(programs=32, length=4096) == 8  # 2 * 132 / 32 -> 8
    assert num_splits(programs=1, length=100_000) == 64
    assert num_splits(programs=8, length=BLOCK_S) == 1


def test_position_advances_without_recompiling():
    """pos is read on the device: one launch config serves every position (CUDA-graph safe)."""
    q, k, v, _ = _case(1, 4, 2, 128, 32, 127, torch.float16)
    for p in (0, 63, 64, 100):
        pos = torch.tensor([p], device=DEV)
        ref = decode_attention_ref(q, k, v, pos)
        torch.testing.assert_close(decode_attention(q, k, v, pos).float(), ref.float(), rtol=4e-3, atol=4e-3)


def test_op_under_compile():
    torch._dynamo.reset()
    q, k, v, pos = _case(2, 4, 2, 64, 16, 20, torch.float16)
    fn = torch.compile(lambda q, k, v, p: decode_attention_op(q, k, v, p) * 2, fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, pos), decode_attention(q, k, v, pos) * 2)


def test_bad_inputs():
    q, k, v, pos = _case(1, 4, 2, 64, 16, 5, torch.float16)
    assert unsupported(q, k, v, pos) is None
    cases = [
        ((torch.randn(1, 4, 2, 16, dtype=torch.float16, device=DEV), k, v, pos), "one new token"),
        ((q, k[:, :, :, :8], v, pos), "k/v cache"),
        ((torch.randn(1, 3, 1, 16, dtype=torch.float16, device=DEV), k, v, pos), "multiple"),
        ((q.float(), k, v, pos), "dtype"),
        ((q, k, v, torch.tensor([1, 2], device=DEV)), "one int32/int64 position"),
        ((q, k.transpose(2, 3).contiguous().transpose(2, 3), v, pos), "unit stride"),
    ]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            decode_attention(*args)
    for bad in (0, 3, 128):
        with pytest.raises(ValueError, match="splits must be"):
            decode_attention(q, k, v, pos, splits=bad)
    q24 = torch.randn(1, 4, 1, 24, dtype=torch.float16, device=DEV)
    kv24 = torch.randn(1, 2, 64, 24, dtype=torch.float16, device=DEV)
    assert "power of two" in unsupported(q24, kv24, kv24, pos)
