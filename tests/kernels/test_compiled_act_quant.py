"""Activation quantization inside torch.compile'd graphs (act_quant_traceable).

A compiled W4A8 linear that would run act_quant and then an int8 kernel quantizes in plain
torch ops instead, so Inductor fuses the quantization into the kernel producing x. These tests
hold it to act_quant's integers: eager and Inductor-compiled (C++ on CPU, Triton on a GPU), and
check that the graph routes through lowbit::w4a8_linear_q with outputs equal to eager.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import lowbit
from lowbit.core.kernel_choice import KernelChoice
from lowbit.kernels.w4a8.act_quant import act_quant, act_quant_traceable
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a
from lowbit.kernels.w4a8.reference import act_quant_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _inputs(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    x = (torch.randn(m, k, device=DEV) * torch.logspace(-3, 3, m, device=DEV).unsqueeze(1)).to(dtype)
    x[1] = 0.0  # all-zero row: scale floored at FLT_MIN, q = 0
    # ties: amax 127 gives scale 1, so x / scale lands exactly on k + 0.5 (half-to-even)
    x[2] = 0.0
    x[2, :6] = torch.tensor([127.0, 2.5, 3.5, -0.5, -1.5, 126.5])
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_traceable_matches_reference_eager(dtype):
    x = _inputs(33, 300, dtype)
    q, s = act_quant_traceable(x)
    qr, sr = act_quant_ref(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (33, 1)
    assert torch.equal(q, qr) and torch.equal(s, sr)
    assert q[2, :6].tolist() == [127, 2, 4, 0, -2, 126]
    assert torch.all(q[1] == 0) and s[1].item() > 0
    if dtype != torch.float32 or DEV == "cuda":
        qk, sk = act_quant(x)
        assert torch.equal(q, qk) and torch.equal(s, sk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_traceable_matches_reference_compiled(dtype):
    """Inductor's code (Triton on a GPU: approximate float32 `/`, constant divisions turned into
    reciprocal multiplies) still gives act_quant's integers and scales."""
    torch._dynamo.reset()
    x = _inputs(64, 4096 if DEV == "cuda" else 256, dtype)
    x[3:] = x[3:] * (1 + torch.rand_like(x[3:], dtype=torch.float32) * 1e-3).to(dtype)
    q, s = torch.compile(act_quant_traceable, fullgraph=True)(x)
    qr, sr = act_quant_ref(x)
    assert torch.equal(s, sr)
    assert torch.equal(q, qr)


def _eager_and_compiled(model, x):
    """(eager output, compiled output, the ATen/custom ops of the compiled forward graph)."""
    torch._dynamo.reset()
    graphs = []

    def fw(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        eager = model(x)
        got = torch.compile(model, backend=aot_autograd(fw_compiler=fw), fullgraph=True)(x)
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    return eager, got, ops


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("m", [16, 80])
def test_compiled_w4a8_quantizes_in_graph(m, group_size):
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    model = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.SiLU(), torch.nn.Linear(128, 64))
    model = model.to(DEV, dtype)
    lowbit.quantize_(model, lowbit.W4A8Config(group_size=group_size, kernel=KernelChoice.TRITON))
    eager, got, ops = _eager_and_compiled(model, torch.randn(m, 256, device=DEV, dtype=dtype))
    assert "lowbit.w4a8_linear_q.default" in ops and "lowbit.int4_linear.default" not in ops
    assert "aten.amax.default" in ops  # the quantization is in the graph, for Inductor to fuse
    assert torch.equal(got, eager)


def test_compiled_w4a8_one_token_long_k_quantizes_in_graph():
    """M = 1, per-row weight, K > LONG_ROW_MIN_K: the graph quantizes (for Inductor to fuse into
    the producer) and runs the pre-quantized dp4a GEMV, as eager does after act_quant. Same
    integers, same epilogue order: equal outputs. Group-wise weights and K <= LONG_ROW_MIN_K keep
    the single op (the GEMV that quantizes in its prologue)."""
    from lowbit.kernels.w4a8.op import LONG_ROW_MIN_K

    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    k = LONG_ROW_MIN_K + 256
    for group_size, in_k, in_graph in ((None, k, True), (64, k, False), (None, 256, False)):
        model = torch.nn.Linear(in_k, 16).to(DEV, dtype)
        lowbit.quantize_(model, lowbit.W4A8Config(group_size=group_size, kernel=KernelChoice.TRITON))
        x = torch.randn(1, in_k, device=DEV, dtype=dtype)
        eager, got, ops = _eager_and_compiled(model, x)
        assert ("lowbit.w4a8_linear_q.default" in ops) is in_graph
        assert ("lowbit.int4_linear.default" in ops) is not in_graph
        assert ("aten.amax.default" in ops) is in_graph
        assert torch.equal(got, eager)
        # the streaming GEMV (which quantizes in its prologue) gives the same output bit for bit
        w = model.weight
        stream = w4a8_gemv_dp4a(x, w.qdata, w.scale, model.bias, w.group_size, kernel="stream")
        assert torch.equal(eager.reshape(stream.shape), stream)


def test_compiled_w4a8_two_to_four_tokens_keep_the_fused_gemv():
    """M = 2..4: the dp4a GEMV quantizes in its own prologue; the graph keeps the single op."""
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    model = torch.nn.Linear(256, 128).to(DEV, dtype)
    lowbit.quantize_(model, lowbit.W4A8Config(kernel=KernelChoice.TRITON))
    eager, got, ops = _eager_and_compiled(model, torch.randn(3, 256, device=DEV, dtype=dtype))
    assert "lowbit.int4_linear.default" in ops and "lowbit.w4a8_linear_q.default" not in ops
    assert torch.equal(got, eager)


def test_two_to_four_tokens_with_rows_too_long_to_stream_take_gemv_q(monkeypatch):
    """M = 2..4 with K too long for the streaming GEMV's registers: eager AUTO quantizes once and runs
    the pre-quantized gemv_q (the blocked dp4a kernel re-read the weight per token), and a compiled
    graph quantizes in the graph for the same kernel. Outputs equal the reference path's within
    rounding and eager equals compiled."""
    import lowbit.kernels.w4a8.gemv_q as gemv_q_mod
    from lowbit.kernels.w4a8.gemv_dp4a import stream_supported
    from lowbit.kernels.w4a8.op import _dp4a_takes, quantizes_in_graph

    k = 8224  # next_pow2 = 16384: two rows exceed the streamer's 16384 register elements
    assert not stream_supported(2, k, 0) and stream_supported(1, k, 0) and stream_supported(3, 4096, 0)
    assert not _dp4a_takes(2, k, k, "auto") and _dp4a_takes(1, k, 32, "auto") and _dp4a_takes(2, k, k, "gemv")
    assert not _dp4a_takes(1, k, k, "auto")  # one long per-row row: act_quant + gemv_q as well
    assert _dp4a_takes(3, 4096, 4096, "auto")
    assert quantizes_in_graph(2, k, k, True, "auto") and not quantizes_in_graph(3, 4096, 4096, True, "auto")
    calls = []
    real = gemv_q_mod.w4a8_gemv_q
    monkeypatch.setattr(gemv_q_mod, "w4a8_gemv_q",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    model = torch.nn.Linear(k, 8).to(DEV, dtype)
    lowbit.quantize_(model, lowbit.W4A8Config(group_size=None, kernel=KernelChoice.TRITON))
    x = torch.randn(2, k, device=DEV, dtype=dtype)
    with torch.no_grad():
        model(x)
    assert calls == [2]  # eager
    eager, got, ops = _eager_and_compiled(model, x)
    assert "lowbit.w4a8_linear_q.default" in ops and "lowbit.int4_linear.default" not in ops
    assert torch.equal(got, eager)
    from lowbit.formats.int4 import w4a8_linear_reference

    with torch.no_grad():
        want = w4a8_linear_reference(x, model.weight, model.bias)
    torch.testing.assert_close(eager.float(), want.float(), rtol=2**-7,
                               atol=want.float().abs().max().item() * 1e-3)


def test_dp4a_route_by_row_length_and_group():
    """The dp4a GEMV keeps 2-4 tokens only where its streamer holds the rows (M x next_pow2(K) <=
    16384 words), per row and group-wise, and one token except a per-row row longer than
    LONG_ROW_MIN_K; explicit path "gemv" always keeps it."""
    from lowbit.kernels.w4a8.op import _dp4a_takes

    assert _dp4a_takes(2, 8192, 8192, "auto") and not _dp4a_takes(2, 8224, 8224, "auto")
    assert _dp4a_takes(3, 4096, 4096, "auto") and not _dp4a_takes(3, 5120, 5120, "auto")
    assert not _dp4a_takes(4, 8192, 128, "auto") and _dp4a_takes(4, 4096, 128, "auto")
    assert _dp4a_takes(1, 16384, 128, "auto") and _dp4a_takes(4, 8192, 8192, "gemv")
    # one per-row token: up to LONG_ROW_MIN_K only (longer rows: act_quant + gemv_q)
    assert _dp4a_takes(1, 8192, 8192, "auto") and not _dp4a_takes(1, 8224, 8224, "auto")
    assert _dp4a_takes(1, 8224, 8224, "gemv")


def test_w4a8_triton_zero_tokens():
    """No tokens: an empty (0, N) output from the Triton route, not a kernel launch error."""
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    model = torch.nn.Linear(256, 64).to(DEV, dtype)
    lowbit.quantize_(model, lowbit.W4A8Config(kernel=KernelChoice.TRITON))
    with torch.no_grad():
        y = model(torch.randn(0, 256, device=DEV, dtype=dtype))
    assert y.shape == (0, 64) and y.dtype == dtype
