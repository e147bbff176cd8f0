"""2:4 formats on the reference path: exact vs the dense math on the pruned weight, storage,
quantize_ / torch.compile / serialization round trips, bad input, kernel selection."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import (
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationSemiSparseInt8WeightConfig,
    KernelChoice,
    LoadError,
    QuantConfig,
    SemiSparseConfig,
)
from lowbit.formats.int8 import Int8Tensor
from lowbit.serialization import WEIGHTS_FILE
from lowbit.sparsity import SemiSparseInt8Tensor, SemiSparseTensor, backends, is_24, prune_24
from lowbit.sparsity.backends import Path, choose_path

CONFIGS = [SemiSparseConfig, Int8DynamicActivationSemiSparseInt8WeightConfig]


def _model(n_in: int = 64, hidden: int = 96, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, 32, bias=False)).to(dtype)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(prune_24(m.weight))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_semisparse_equals_dense_linear_on_pruned_weight(dtype, m):
    w = prune_24(torch.randn(96, 64)).to(dtype)
    bias = torch.randn(96).to(dtype)
    q = SemiSparseConfig().quantize_weight(w)
    assert isinstance(q, SemiSparseTensor) and q.qdata.numel() == w.numel() // 2
    for x in (torch.randn(m, 64).to(dtype), torch.randn(2, m, 64).to(dtype)):
        assert torch.equal(F.linear(x, q, bias), F.linear(x, w, bias))
    assert torch.equal(q.dequantize(), w) and is_24(q.dequantize())


@pytest.mark.parametrize("threshold", [0, 8])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_int8_semisparse_equals_dense_int8dq_of_pruned_weight(threshold, m):
    """Exact integer dots: bit-identical to lowbit's dense W8A8 of the pruned weight (and with a
    decode_threshold, to its weight-only path below the threshold)."""
    w = prune_24(torch.randn(96, 64))
    bias = torch.randn(96)
    sparse = Int8DynamicActivationSemiSparseInt8WeightConfig(decode_threshold=threshold).quantize_weight(w)
    dense = Int8DynamicActivationInt8WeightConfig(decode_threshold=threshold).quantize_weight(w)
    assert isinstance(sparse, SemiSparseInt8Tensor) and isinstance(dense, Int8Tensor)
    assert torch.equal(sparse.dense_values(), dense.qdata) and is_24(sparse.dense_values())
    assert torch.equal(sparse.scale, dense.scale)
    for x in (torch.randn(m, 64), torch.randn(3, m, 64, dtype=torch.bfloat16)):
        b = bias.to(x.dtype)
        assert torch.equal(F.linear(x, sparse, b), F.linear(x, dense, b))
    assert torch.equal(sparse.dequantize(), dense.dequantize())


@pytest.mark.parametrize("cls", CONFIGS)
def test_quantize_prunes_only_when_asked(cls):
    model = nn.Sequential(nn.Linear(64, 96))
    before = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"not 2:4 sparse \(.* of 1536 groups .*prune=True"):
        lowbit.quantize_(model, cls())
    assert type(model[0].weight) is nn.Parameter and torch.equal(model[0].weight, before)
    lowbit.quantize_(model, cls(prune=True))
    stored, pruned = model[0].weight, prune_24(before)
    assert is_24(stored.dense_values())
    assert not ((stored.dequantize() != 0) & (pruned == 0)).any()  # int8 rounding may add zeros only
    if cls is SemiSparseConfig:
        assert torch.equal(stored.dequantize(), pruned)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_layer_is_2_4_and_stored_compressed(cls):
    model = lowbit.quantize_(_model(), cls())
    for lin in (model[0], model[2]):
        q = lin.weight
        n, k = q.shape
        assert q.qdata.shape == (n, k // 2) and q.meta.shape == (n, k // 8) and q.meta.dtype == torch.uint8
        assert is_24(q.dequantize())
        # half the values, a 4-bit code per group of 4 (1 bit per weight), int8: a scale per row
        scales = 0 if cls is SemiSparseConfig else 4 * n
        assert q.nbytes_stored() == n * k // 2 * q.qdata.element_size() + n * k // 8 + scales
    assert set(model._lowbit_configs) == {"0", "2"}


def test_unsupported_shapes_are_skipped_and_listed_or_refused():
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 40), nn.Linear(40, 8))  # N=40, then K=40
    for m in model:
        with torch.no_grad():
            m.weight.copy_(prune_24(m.weight))
    with pytest.warns(
        UserWarning,
        match=r"skipped 2 layer\(s\).*'?1 \(cuSPARSELt 2:4 needs N % 16 == 0 and "
        r"K % 16 == 0, got N=40, K=96\)",
    ):
        lowbit.quantize_(model, SemiSparseConfig())
    assert isinstance(model[0].weight, SemiSparseTensor) and type(model[2].weight) is nn.Parameter
    with pytest.raises(ValueError, match="K % 32 == 0, got N=8, K=40"):
        lowbit.quantize_(
            copy.deepcopy(model),
            Int8DynamicActivationSemiSparseInt8WeightConfig(),
            filter_fn=lambda m, n: n == "2",
            on_unsupported="error",
        )
    assert "K % 64 == 0, got N=32, K=96" in SemiSparseConfig(kernel="cutlass").unsupported_reason(32, 96)
    assert "K % 128" in Int8DynamicActivationSemiSparseInt8WeightConfig(kernel="cutlass").unsupported_reason(
        16, 64
    )
    assert SemiSparseConfig(kernel="reference").unsupported_reason(3, 40) is None
    assert "K % 8 == 0" in SemiSparseConfig(kernel="reference").unsupported_reason(3, 12)


@pytest.mark.parametrize("cls", CONFIGS)
def test_config_validation_and_json_round_trip(cls):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.prune=1 must be a bool"):
        cls(prune=1)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.kernel='cuda' is invalid"):
        cls(kernel="cuda")
    cfg = cls(prune=True, kernel="reference")
    back = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and type(back) is cls and back != cls()
    if cls is Int8DynamicActivationSemiSparseInt8WeightConfig:
        with pytest.raises(ValueError, match="decode_threshold=-1"):
            cls(decode_threshold=-1)


@pytest.mark.parametrize("cls", CONFIGS)
def test_save_load_round_trips_are_exact(cls, tmp_path):
    model = lowbit.quantize_(_model(), cls())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _model()
    fresh.load_state_dict(torch.load(buf, weights_only=True), assign=True)
    lowbit.save_quantized(model, tmp_path)
    loaded = lowbit.load_quantized(_model(), tmp_path)
    with torch.no_grad():
        for other in (fresh, loaded):
            assert type(other[0].weight) is type(model[0].weight)
            for name in model[0].weight.tensor_data_names:
                assert torch.equal(getattr(other[0].weight, name), getattr(model[0].weight, name))
            assert torch.equal(other(x), want)
    assert loaded._lowbit_configs == model._lowbit_configs


def test_load_rejects_a_weights_file_of_the_wrong_layout(tmp_path):
    from safetensors.torch import load_file, save_file

    model = lowbit.quantize_(_model(), SemiSparseConfig())
    lowbit.save_quantized(model, tmp_path)
    flat = load_file(str(tmp_path / WEIGHTS_FILE))
    flat["0.weight.meta"] = flat["0.weight.meta"][:, :4].contiguous()
    save_file(flat, str(tmp_path / WEIGHTS_FILE))
    target = _model()
    before = target[0].weight.detach().clone()
    with pytest.raises(LoadError, match=r"0.weight.meta: stored shape \(96, 4\) != expected \(96, 8\)"):
        lowbit.load_quantized(target, tmp_path)
    assert torch.equal(target[0].weight, before)


@pytest.mark.parametrize("cls", CONFIGS)
def test_compile_fullgraph_matches_eager(cls):
    torch._dynamo.reset()
    kwargs = {"decode_threshold": 4} if cls is Int8DynamicActivationSemiSparseInt8WeightConfig else {}
    model = lowbit.quantize_(_model(), cls(**kwargs))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on AOT-cache hashing of tensor subclasses
        for x in (torch.randn(2, 3, 64), torch.randn(1, 64)):  # 6 tokens (W8A8) and 1 (weight-only)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_dtype_cast_detach_and_clone_keep_the_numbers():
    model = lowbit.quantize_(_model(), SemiSparseConfig())
    w = model[0].weight
    half = model.to(torch.bfloat16)[0].weight
    assert half.dtype == torch.bfloat16 and half.qdata.dtype == torch.bfloat16
    assert torch.equal(half.dequantize().float(), w.dequantize().to(torch.bfloat16).float())
    c = half.detach().clone()
    assert type(c) is SemiSparseTensor and torch.equal(c.qdata, half.qdata) and c.qdata is not half.qdata


def test_explicit_gpu_kernels_on_cpu_raise_clearly():
    w = prune_24(torch.randn(32, 64))
    x = torch.randn(3, 64)
    for kernel, name in ((KernelChoice.TORCH, "cusparselt"), (KernelChoice.CUTLASS, "cutlass")):
        q = SemiSparseConfig(kernel=kernel).quantize_weight(w)
        with pytest.raises(
            RuntimeError,
            match=rf"kernel='{kernel.value}' requested for SemiSparse but "
            rf"unavailable: {name} needs a CUDA weight",
        ):
            F.linear(x, q)
    q = SemiSparseConfig(kernel="triton").quantize_weight(w)
    with pytest.raises(RuntimeError, match="kernel='triton'.*no such 2:4 kernel"):
        F.linear(x, q)


def test_kernel_choice_table():
    cs, ct = backends.CUSPARSELT, backends.CUTLASS
    auto = KernelChoice.AUTO
    assert choose_path(auto, False, 4096, 0, cs) is Path.REFERENCE  # CPU: reference
    assert choose_path(auto, True, 4096, 128, cs) is Path.CUSPARSELT
    assert choose_path(auto, True, 16, 128, cs) is Path.DENSE  # below the measured crossover
    assert choose_path(auto, True, 4096, 0, ct) is Path.CUTLASS
    assert choose_path(auto, True, 4096, 0, None) is Path.DENSE  # nothing prepared (warned)
    assert choose_path(KernelChoice.TORCH, True, 1, 128, cs) is Path.CUSPARSELT  # explicit: no threshold
    assert choose_path(KernelChoice.TORCH, True, 1, 0, None) == cs  # caller raises with the reason
    assert choose_path(KernelChoice.REFERENCE, True, 4096, 0, cs) is Path.REFERENCE


@pytest.mark.parametrize("m", [1, 7, 33])
def test_gpu_kernel_glue_with_cpu_stand_ins(fake_gpu_kernels, m):
    """Padding, transposed operands, fused alpha scales and bias around torch's 2:4 ops, with the
    ops replaced by exact CPU stand-ins (conftest.py). The real kernels: test_sparse_cuda.py."""
    w = prune_24(torch.randn(64, 128))
    x32, bias = torch.randn(2, m, 128), torch.randn(64)
    for backend, kernel in (
        (backends.CUSPARSELT, KernelChoice.TORCH),
        (backends.CUTLASS, KernelChoice.CUTLASS),
    ):
        ref = SemiSparseConfig(kernel="reference").quantize_weight(w.to(torch.bfloat16))
        packed, pmeta = backends.pack_for(backend, ref.dense_values())
        fast = SemiSparseTensor(
            ref.qdata,
            ref.meta,
            shape=ref.shape,
            dtype=ref.dtype,
            kernel=kernel,
            packed=packed,
            packed_meta=pmeta,
            backend=backend,
        )
        x, b = x32.to(torch.bfloat16), bias.to(torch.bfloat16)
        want = F.linear(x.float(), ref.dequantize(torch.float32), b.float())
        got = F.linear(x, fast, b)
        assert got.shape == (2, m, 64) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
        with pytest.raises(RuntimeError, match="activation dtype torch.float32 != weight dtype"):
            F.linear(x32, fast)
        iref = Int8DynamicActivationSemiSparseInt8WeightConfig(kernel="reference").quantize_weight(w)
        packed, pmeta = backends.pack_for(backend, iref.dense_values())
        ifast = SemiSparseInt8Tensor(
            iref.qdata,
            iref.meta,
            iref.scale,
            shape=iref.shape,
            dtype=iref.dtype,
            block_size=iref.block_size,
            act_quant=iref.act_quant,
            kernel=kernel,
            packed=packed,
            packed_meta=pmeta,
            backend=backend,
        )
        # int32 accumulation (fp32 activations) is exact; bf16 output with the fused alpha rounds once more.
        assert torch.equal(F.linear(x32, ifast, bias), F.linear(x32, iref, bias))
        want8 = F.linear(x32.to(torch.bfloat16), iref, bias.to(torch.bfloat16)).float()
        got8 = F.linear(x32.to(torch.bfloat16), ifast, bias.to(torch.bfloat16)).float()
        torch.testing.assert_close(got8, want8, rtol=2**-6, atol=2**-7 * want8.abs().max().item())
        assert ifast.detach().packed is not None and ifast.detach().backend == backend  # carried along
