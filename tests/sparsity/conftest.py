"""Shared pieces: a CPU stand-in for torch's GPU 2:4 kernels, so the glue around them (padding,
transposed operands, fused scales, bias, slicing) is tested here; the real kernels are tested
by test_sparse_cuda.py on a GPU."""

from __future__ import annotations

import pytest
import torch


def _fake_cslt_compress(dense: torch.Tensor) -> torch.Tensor:
    # The real buffer is opaque; the stand-in keeps the dense 2:4 matrix, tagged so a
    # mix-up with the stored values would show.
    return dense.clone()


def _fake_cslt_sparse_mm(
    packed,
    dense_b,
    bias=None,
    alpha=None,
    out_dtype=None,
    transpose_result=False,
    alg_id=0,
    split_k=1,
    split_k_mode=-1,
):
    bits = 8 if packed.dtype == torch.int8 else 16
    # torch's dense-operand minimums (8 for 16-bit, 16 for 8-bit): the caller must pad.
    assert dense_b.shape[1] % (16 if bits == 8 else 8) == 0, dense_b.shape
    if bits == 8:  # cuSPARSELt's 8-bit GEMMs take x^T only as a transposed view
        assert not dense_b.is_contiguous() or dense_b.shape[1] == 1, "8-bit: contiguous x^T"
    acc = packed.to(torch.float64) @ dense_b.to(torch.float64)  # (N, M), exact for int8
    if alpha is not None:
        acc = acc * alpha.to(torch.float64).reshape(-1, 1)
    if bias is not None:
        acc = acc + bias.to(torch.float64).reshape(-1, 1)
    out = acc.to(out_dtype or dense_b.dtype)
    return out.t().contiguous() if transpose_result else out


def _fake_semi_structured_mm(values, meta, dense_b, out_dtype=None):
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    w = sparse_semi_structured_to_dense_cutlass(values, meta)
    acc = w.to(torch.float64) @ dense_b.to(torch.float64)
    return acc.to(out_dtype or dense_b.dtype)


@pytest.fixture
def fake_gpu_kernels(monkeypatch):
    """Route torch's cuSPARSELt / CUTLASS 2:4 ops to exact CPU stand-ins."""
    monkeypatch.setattr(torch, "_cslt_compress", _fake_cslt_compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", _fake_cslt_sparse_mm)
    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", _fake_semi_structured_mm)
    yield
