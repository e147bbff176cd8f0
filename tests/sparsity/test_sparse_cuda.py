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
@pytest.mark.parametrize("m", [1, 7, 33, 128, 1030])  # 1030: the (N, M) result layout (>= 1024 tokens)
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
@pytest.mark.parametrize("m", [1, 7, 33, 128, 1030])
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


@pytest.mark.parametrize("fmt", ["bf16", "int8dq"])
def test_chained_prefill_layers(fmt):
    """From 1024 tokens a 2:4 linear returns an (M, N) transposed view; an MLP of 2:4 layers takes
    it as the next layer's input (int8: copied to the layout cuSPARSELt's 8-bit GEMMs take)."""
    cfg = SemiSparseConfig if fmt == "bf16" else Int8DynamicActivationSemiSparseInt8WeightConfig
    w1 = prune_24(torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16))
    w2 = prune_24(torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16))
    fast = [cfg(kernel="torch").quantize_weight(w) for w in (w1, w2)]
    ref = [cfg(kernel="reference").quantize_weight(w) for w in (w1, w2)]
    x = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    h = F.silu(F.linear(x, fast[0]))
    assert not h.is_contiguous()
    got = F.linear(h, fast[1]).float()
    want = F.linear(F.silu(F.linear(x, ref[0])), ref[1]).float()
    assert sqnr_db(want, got) > 35


@pytest.mark.parametrize("tokens", [15, 1030])  # 1030: the (N, M) result layout inside the graph
@pytest.mark.parametrize("cfg", [Int8DynamicActivationSemiSparseInt8WeightConfig, SemiSparseConfig])
def test_compile_fullgraph_runs_the_sparse_kernel(tokens, cfg):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 512)).cuda().to(torch.bfloat16)
    lowbit.sparsity.sparsify_(model, cfg())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model(x)  # eager first: searches the algorithms the graph then uses
        torch.testing.assert_close(compiled(x), want, rtol=2e-2, atol=2e-2)


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


@pytest.mark.parametrize("m", [1, 33, 2048])
def test_searched_algorithm_matches_the_default_algorithm(m):
    """cuSPARSELt's searched plan (algorithm + split-K) computes what alg 0 computes: int32
    accumulation bit for bit; bf16 outputs within their rounding. The search ran (it is cached)."""
    backends.clear_algorithm_cache()
    w = prune_24(torch.randn(1024, 2048, device="cuda"))
    x32 = torch.randn(m, 2048, device="cuda")
    xb = x32.to(torch.bfloat16)
    bf = SemiSparseConfig(kernel="torch").quantize_weight(w.to(torch.bfloat16))
    i8 = Int8DynamicActivationSemiSparseInt8WeightConfig(kernel="torch").quantize_weight(w)
    with backends.algorithm_search(True):
        searched = [F.linear(xb, bf), F.linear(x32, i8), F.linear(xb, i8)]
    assert len(backends.algorithm_cache()) == 3, backends.algorithm_cache()
    with backends.algorithm_search(False):
        default = [F.linear(xb, bf), F.linear(x32, i8), F.linear(xb, i8)]
    ref = F.linear(x32, w)
    assert sqnr_db(ref, searched[0].float()) > 45 and sqnr_db(default[0].float(), searched[0].float()) > 45
    assert torch.equal(searched[1], default[1])
    assert sqnr_db(default[2].float(), searched[2].float()) > 40


def test_no_search_during_cuda_graph_capture():
    """A token bucket first seen inside capture runs the default algorithm and caches nothing;
    the captured graph replays correctly."""
    backends.clear_algorithm_cache()
    w = prune_24(torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16))
    q = SemiSparseConfig(kernel="torch").quantize_weight(w)
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture, at another bucket (searches once)
        F.linear(torch.randn(300, 1024, device="cuda", dtype=torch.bfloat16), q)
    torch.cuda.current_stream().wait_stream(stream)
    assert len(backends.algorithm_cache()) == 1
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = F.linear(x, q)
    assert len(backends.algorithm_cache()) == 1  # nothing searched or cached while capturing
    x.copy_(torch.randn_like(x))
    g.replay()
    assert sqnr_db(F.linear(x.float(), w.float()), y.float()) > 45
