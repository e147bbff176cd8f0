"""2:4 formats on a GPU with torch's real 2:4 kernels (cuSPARSELt; CUTLASS on sm8x) vs the
reference path. Needs CUDA: this module is skipped without a GPU."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import Int8DynamicActivationSemiSparseInt8WeightConfig, KernelChoice, SemiSparseConfig
from lowbit.sparsity import backends, prune_24
from lowbit.testing import sqnr_db

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(256, 512), (4096, 4096)]


def _kernels() -> list[KernelChoice]:
    """Explicit 2:4 kernels this GPU runs (a missing one is reported by test_auto_prepares...)."""
    out: list[KernelChoice] = []
    if not torch.cuda.is_available():
        return out
    if (
        backends.unavailable_reason(backends.CUSPARSELT, torch.bfloat16, torch.device("cuda"), 256, 512)
        is None
    ):
        out.append(KernelChoice.TORCH)
    if torch.cuda.get_device_capability()[0] == 8:
        out.append(KernelChoice.CUTLASS)
    return out


def test_auto_prepares_cusparselt_on_cuda():
    w = prune_24(torch.randn(256, 512, device="cuda", dtype=torch.bfloat16))
    q = SemiSparseConfig().quantize_weight(w)
    assert q.backend == backends.CUSPARSELT, backends.unavailable_reason(
        backends.CUSPARSELT, torch.bfloat16, w.device, 256, 512
    )
    assert q.packed is not None


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 7, 33, 128])
def test_bf16_kernels_match_the_reference(kernel, n, k, m):
    w = prune_24(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)
    fast = SemiSparseConfig(kernel=kernel).quantize_weight(w)
    ref = F.linear(x.float(), w.float(), bias.float())
    got = F.linear(x, fast, bias)
    assert got.shape == (2, m, n) and got.dtype == torch.bfloat16
    assert sqnr_db(ref, got.float()) > 45  # bf16 output rounding (~50 dB) plus accumulation order


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 7, 33, 128])
def test_int8_kernels_match_the_reference(kernel, n, k, m):
    w = prune_24(torch.randn(n, k, device="cuda"))
    x32 = torch.randn(m, k, device="cuda")
    fast = Int8DynamicActivationSemiSparseInt8WeightConfig(kernel=kernel).quantize_weight(w)
    ref = Int8DynamicActivationSemiSparseInt8WeightConfig(kernel="reference").quantize_weight(w)
    # fp32 activations: exact int32 accumulation; cuSPARSELt applies the row scale as its alpha
    # vector, so only the order of the two float multiplies differs: fp32 rounding, >= 120 dB
    # (a wrong integer or a misplaced scale is below 60 dB).
    assert sqnr_db(F.linear(x32, ref), F.linear(x32, fast)) > 120
    xb = x32.to(torch.bfloat16)
    got, want = F.linear(xb, fast).float(), F.linear(xb, ref).float()
    assert sqnr_db(want, got) > 40  # bf16 output with the fused row scale: two roundings


def test_compile_fullgraph_runs_the_sparse_kernel():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 512)).cuda().to(torch.bfloat16)
    lowbit.sparsity.sparsify_(model, Int8DynamicActivationSemiSparseInt8WeightConfig())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(compiled(x), model(x), rtol=2e-2, atol=2e-2)


def test_state_dict_saved_on_gpu_loads_on_cpu_and_back():
    model = nn.Sequential(nn.Linear(512, 256)).cuda().to(torch.bfloat16)
    lowbit.sparsity.sparsify_(model, SemiSparseConfig())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True, map_location="cpu")
    # Only the stored layout is pickled (the cuSPARSELt buffer is rebuilt on the device).
    cpu = nn.Sequential(nn.Linear(512, 256)).to(torch.bfloat16)
    cpu.load_state_dict(sd, assign=True)
    back = cpu.cuda()
    assert back[0].weight.backend == model[0].weight.backend  # rebuilt on the device
    x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
