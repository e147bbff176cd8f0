"""W8A8 (int8dq) on the Triton kernels: act_quant + int8_gemm through lowbit::int8_dynamic_linear,
against the format's exact-integer reference path. CPU through TRITON_INTERPRET=1; GPU compiled
(where AUTO also takes it from TRITON_MIN_TOKENS tokens on)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd

import lowbit
from lowbit.core.kernel_choice import KernelChoice
from lowbit.formats.int8 import TRITON_MIN_TOKENS, Int8Tensor
from lowbit.kernels.int8_dynamic import int8_dynamic_linear, int8_dynamic_linear_op

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEV == "cuda"
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16]


def _models(n, k, dtype, bias=True):
    lin = torch.nn.Linear(k, n, bias=bias).to(DEV, dtype)
    ref = lowbit.quantize_(copy.deepcopy(lin), lowbit.Int8DynamicActivationInt8WeightConfig(
        kernel=KernelChoice.REFERENCE))
    tri = lowbit.quantize_(copy.deepcopy(lin), lowbit.Int8DynamicActivationInt8WeightConfig(
        kernel=KernelChoice.TRITON))
    return lin, ref, tri


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (7, 72, 256), (33, 24, 160), (300, 48, 112)]
                         + ([(2048, 4096, 4096)] if ON_GPU else []))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_triton_w8a8_matches_the_integer_reference(m, n, k, dtype, bias):
    torch.manual_seed(0)
    _, ref, tri = _models(n, k, dtype, bias)
    assert isinstance(tri.weight, Int8Tensor) and tri.weight.kernel is KernelChoice.TRITON
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    with torch.no_grad():
        want = ref(x)
        got = tri(x)
    assert got.dtype == dtype and got.shape == (m, n)
    # same integers (act_quant == quantize_per_token_sym, exact int32 sums); the epilogue rounds
    # once to the output dtype (the reference rounds the product, then adds the bias in dtype)
    eps = torch.finfo(dtype).eps
    atol = 4 * eps * want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * eps, atol=atol)


def test_leading_dims_and_op_entry_points():
    torch.manual_seed(1)
    _, ref, tri = _models(40, 96, torch.float16)
    x = torch.randn(2, 3, 96, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        out = tri(x)
        assert out.shape == (2, 3, 40)
        w = tri.weight
        direct = int8_dynamic_linear(x.reshape(6, 96), w.qdata, w.scale, tri.bias)
        via_op = int8_dynamic_linear_op(x.reshape(6, 96), w.qdata, w.scale, tri.bias)
    assert torch.equal(direct, via_op) and torch.equal(out.reshape(6, 40), direct)  # one implementation
    torch.testing.assert_close(out.float(), ref(x).float(), rtol=4e-3, atol=4e-3)


def test_bad_inputs_raise():
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8, device=DEV)
    s = torch.rand(8, 1, device=DEV)
    with pytest.raises(ValueError, match="fp16/bf16"):
        int8_dynamic_linear(torch.randn(3, 64, device=DEV), w, s, None)
    with pytest.raises(ValueError, match=r"x \(M, K\)"):
        int8_dynamic_linear(torch.randn(3, 32, device=DEV, dtype=torch.float16), w, s, None)
    with pytest.raises(ValueError, match="int8 weight"):
        int8_dynamic_linear(torch.randn(3, 64, device=DEV, dtype=torch.float16), w.float(), s, None)
    with pytest.raises(ValueError, match="one scale per weight row"):
        int8_dynamic_linear(torch.randn(3, 64, device=DEV, dtype=torch.float16), w, s[:4], None)
    # float32 activations with an explicit TRITON kernel: a clear error from the format
    lin = lowbit.quantize_(torch.nn.Linear(64, 8).to(DEV), lowbit.Int8DynamicActivationInt8WeightConfig(
        kernel=KernelChoice.TRITON))
    with pytest.raises(RuntimeError, match="fp16/bf16"):
        lin(torch.randn(2, 64, device=DEV))


def test_routing():
    lin = lowbit.quantize_(torch.nn.Linear(64, 8).to(DEV, torch.float16),
                           lowbit.Int8DynamicActivationInt8WeightConfig())
    w = lin.weight
    many = torch.randn(TRITON_MIN_TOKENS, 64, device=DEV, dtype=torch.float16)
    few = many[: TRITON_MIN_TOKENS - 1]
    assert w._auto_takes_triton(many) is ON_GPU  # AUTO: CUDA only
    assert not w._auto_takes_triton(few)
    assert not w._auto_takes_triton(many.clone().requires_grad_())  # training-time calls keep TORCH
    assert KernelChoice.TRITON not in w._available(many, False)  # weight-only calls: never
    if ON_GPU:
        assert next(iter(w._available(many, True))) is KernelChoice.TRITON  # AUTO tries it first


def test_auto_calls_the_triton_op_from_the_token_threshold(monkeypatch):
    if not ON_GPU:
        pytest.skip("AUTO runs the reference off CUDA")
    import lowbit.kernels.int8_dynamic as mod

    calls = []
    real = mod.int8_dynamic_linear
    monkeypatch.setattr(mod, "int8_dynamic_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    lin = lowbit.quantize_(torch.nn.Linear(64, 8).to(DEV, torch.float16),
                           lowbit.Int8DynamicActivationInt8WeightConfig())
    with torch.no_grad():
        lin(torch.randn(TRITON_MIN_TOKENS, 64, device=DEV, dtype=torch.float16))
        lin(torch.randn(TRITON_MIN_TOKENS - 1, 64, device=DEV, dtype=torch.float16))
    assert calls == [TRITON_MIN_TOKENS]


def test_bias_layouts_and_dtypes():
    torch.manual_seed(3)
    _, ref, tri = _models(40, 96, torch.float16)
    x = torch.randn(33, 96, device=DEV, dtype=torch.float16)
    w = tri.weight
    strided = torch.randn(80, device=DEV, dtype=torch.float16)[::2]  # a non-contiguous bias
    f32 = torch.randn(40, device=DEV)
    with torch.no_grad():
        for bias in (strided, f32):
            got = F.linear(x, w, bias)
            want = F.linear(x, ref.weight, bias)
            assert got.dtype == want.dtype  # a float32 bias promotes the output, as on the TORCH path
            torch.testing.assert_close(got.float(), want.float(), rtol=4e-3, atol=4e-3)


def test_triton_choice_with_a_decode_threshold(monkeypatch):
    import lowbit.kernels.int8_dynamic as mod

    calls = []
    real = mod.int8_dynamic_linear
    monkeypatch.setattr(mod, "int8_dynamic_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    cfg = lowbit.Int8DynamicActivationInt8WeightConfig(kernel=KernelChoice.TRITON, decode_threshold=8)
    lin = lowbit.quantize_(torch.nn.Linear(64, 8).to(DEV, torch.float16), cfg)
    ref = lin.weight.dequantize(torch.float32)
    with torch.no_grad():
        for m in (1, 16):  # 1 token: weight-only; 16: dynamic activations on the Triton kernels
            x = torch.randn(m, 64, device=DEV, dtype=torch.float16)
            want = x.float() @ ref.t() + lin.bias.float()
            torch.testing.assert_close(lin(x).float(), want, rtol=3e-2, atol=3e-2)
    assert calls == [16]


def test_backward_through_the_op():
    torch.manual_seed(2)
    lin, _, tri = _models(24, 64, torch.float16)
    x = torch.randn(5, 64, device=DEV, dtype=torch.float16, requires_grad=True)
    tri(x).float().sum().backward()
    w = tri.weight.dequantize(torch.float32)
    want = torch.ones(5, 24, device=DEV) @ w
    torch.testing.assert_close(x.grad.float(), want, rtol=2e-3, atol=2e-3)
    assert tri.bias.grad is None or torch.allclose(tri.bias.grad.float(), torch.full((24,), 5.0, device=DEV))


def test_compile_fullgraph_keeps_one_opaque_node():
    torch._dynamo.reset()
    _, ref, tri = _models(40, 96, torch.float16)
    graphs = []

    def fw(gm, example_inputs):  # the graph after AOTAutograd has unwrapped the weight subclass
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(tri, fullgraph=True, backend=aot_autograd(fw_compiler=fw))
    x = torch.randn(7, 96, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), tri(x), rtol=0, atol=0)
    assert len(graphs) == 1 and graphs[0].count("target=torch.ops.lowbit.int8_dynamic_linear") == 1, graphs
    torch.library.opcheck(int8_dynamic_linear_op, (x, tri.weight.qdata, tri.weight.scale, tri.bias))
