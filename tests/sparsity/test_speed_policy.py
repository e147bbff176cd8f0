"""cuSPARSELt algorithm search (cache keys, never while capturing or compiling, switch, failure),
AUTO's token thresholds, and the measured-speed helpers (speedup_vs_dense / pays_off /
crossover_tokens, sparsify_(faster_at=...)). torch's GPU ops are CPU stand-ins here (conftest.py);
the real search runs in test_sparse_cuda.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import Int8DynamicActivationSemiSparseInt8WeightConfig, KernelChoice, SemiSparseConfig
from lowbit.formats.int8 import TRITON_MIN_TOKENS
from lowbit.sparsity import (
    SemiSparsePruneConfig,
    SemiSparseTensor,
    backends,
    crossover_tokens,
    cslt_algorithms,
    pays_off,
    prune_24,
    sparsify_,
    speed,
    speedup_vs_dense,
)
from lowbit.sparsity.backends import CsltAlgo


class FakeSearch:
    """torch._C._cusparselt.mm_search stand-in: returns `found`, records each call's operands."""

    def __init__(self, found=(7, 2, 1, 40)):
        self.found, self.calls = found, []

    def mm_search(self, packed, dense_b, bias, alpha, out_dtype, transpose_result):
        self.calls.append((tuple(dense_b.shape), bias is not None, alpha is not None, out_dtype))
        if isinstance(self.found, Exception):
            raise self.found
        return self.found


@pytest.fixture
def gpu_like(fake_gpu_kernels, monkeypatch):
    """CPU tensors taken for GPU ones by the search gate; torch._cslt_sparse_mm records its plan
    arguments; a clean cache with the search on."""
    mm_calls: list[dict] = []
    fake_mm = torch._cslt_sparse_mm

    def recording_mm(*args, **kwargs):
        mm_calls.append({k: kwargs[k] for k in ("alg_id", "split_k", "split_k_mode") if k in kwargs})
        return fake_mm(*args, **kwargs)

    monkeypatch.setattr(torch, "_cslt_sparse_mm", recording_mm)
    monkeypatch.setattr(cslt_algorithms, "_on_gpu", lambda t: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    search = FakeSearch()
    monkeypatch.setattr(torch._C, "_cusparselt", search, raising=False)
    # the timing search: alg 7 (cuSPARSELt's pick above) is the fastest unless a test says otherwise
    search.times = {7: 1.0}

    def fake_time(fn):
        fn()
        return search.times.get(mm_calls[-1].get("alg_id", 0), 10.0)

    monkeypatch.setattr(cslt_algorithms, "_time_us", fake_time)
    backends.clear_algorithm_cache()
    old = backends.set_algorithm_search(True)
    yield search, mm_calls
    backends.set_algorithm_search(old)
    backends.clear_algorithm_cache()


def _sparse_bf16(n: int = 64, k: int = 128) -> tuple[SemiSparseTensor, torch.Tensor]:
    w = prune_24(torch.randn(n, k)).to(torch.bfloat16)
    ref = SemiSparseConfig(kernel="reference").quantize_weight(w)
    packed, _ = backends.pack_for(backends.CUSPARSELT, ref.dense_values())
    fast = SemiSparseTensor(
        ref.qdata, ref.meta, shape=ref.shape, dtype=ref.dtype, kernel=KernelChoice.TORCH,
        packed=packed, backend=backends.CUSPARSELT,
    )  # fmt: skip
    return fast, w


def test_search_once_per_key_and_its_choice_is_run(gpu_like):
    search, mm_calls = gpu_like
    q, w = _sparse_bf16()
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = F.linear(x, q)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=2**-7, atol=0.05)
    assert len(search.calls) == 1 and search.calls[0][0] == (128, 16)  # padded to 16 tokens
    assert mm_calls[-1] == {"alg_id": 7, "split_k": 2, "split_k_mode": 1}
    F.linear(torch.randn(7, 128, dtype=torch.bfloat16), q)  # same bucket (16): cached
    F.linear(torch.randn(2, 3, 128, dtype=torch.bfloat16), q)  # 6 tokens, 3-D: same bucket
    assert len(search.calls) == 1 and mm_calls[-1]["alg_id"] == 7
    F.linear(torch.randn(40, 128, dtype=torch.bfloat16), q)  # bucket 64: a new search
    F.linear(x, q, torch.randn(64, dtype=torch.bfloat16))  # a bias epilogue: a new search
    assert len(search.calls) == 3
    keys = backends.algorithm_cache()
    assert sorted((key.tokens, key.bias) for key in keys) == [(16, False), (16, True), (64, False)]
    assert all(
        (key.n, key.k, key.dtype, key.transpose_result) == (64, 128, torch.bfloat16, True) for key in keys
    )
    assert set(keys.values()) == {CsltAlgo(7, 2, 1)}


def test_int8_search_is_keyed_by_alpha_and_out_dtype(gpu_like):
    search, _ = gpu_like
    w = prune_24(torch.randn(64, 128))
    ref = Int8DynamicActivationSemiSparseInt8WeightConfig(kernel="reference").quantize_weight(w)
    packed, _ = backends.pack_for(backends.CUSPARSELT, ref.dense_values())
    q = type(ref)(
        ref.qdata, ref.meta, ref.scale, shape=ref.shape, dtype=ref.dtype, block_size=ref.block_size,
        act_quant=ref.act_quant, kernel=KernelChoice.TORCH, packed=packed, backend=backends.CUSPARSELT,
    )  # fmt: skip
    x = torch.randn(3, 128)
    assert torch.equal(F.linear(x, q), F.linear(x, ref))  # fp32: int32 out, no alpha
    F.linear(x.to(torch.bfloat16), q)  # bf16: alpha vector, bf16 out
    keys = sorted(backends.algorithm_cache(), key=lambda key: key.alpha)
    assert [(key.alpha, key.out_dtype, key.tokens, key.dtype) for key in keys] == [
        (False, torch.int32, 32, torch.int8),
        (True, torch.bfloat16, 32, torch.int8),
    ]
    assert len(search.calls) == 2


@pytest.mark.parametrize("state", ["capturing", "compiling"])
def test_never_searches_while_capturing_or_compiling(gpu_like, monkeypatch, state):
    search, mm_calls = gpu_like
    q, _ = _sparse_bf16()
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    target = (
        (torch.cuda, "is_current_stream_capturing")
        if state == "capturing"
        else (torch.compiler, "is_compiling")
    )
    with monkeypatch.context() as m:
        m.setattr(*target, lambda: True)
        F.linear(x, q)
        assert not search.calls and mm_calls[-1] == {}  # the default algorithm, nothing cached
        assert not backends.algorithm_cache()
    F.linear(x, q)  # eager again: searched now
    assert len(search.calls) == 1 and mm_calls[-1]["alg_id"] == 7
    with monkeypatch.context() as m:
        m.setattr(*target, lambda: True)
        F.linear(x, q)  # a cached choice is used during capture / tracing
        assert len(search.calls) == 1 and mm_calls[-1]["alg_id"] == 7


def test_search_switch_and_env(gpu_like):
    search, mm_calls = gpu_like
    q, _ = _sparse_bf16()
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with backends.algorithm_search(False):
        F.linear(x, q)
    assert not search.calls and mm_calls[-1] == {}
    F.linear(x, q)
    with backends.algorithm_search(False):
        F.linear(x, q)  # off also ignores what is cached
    assert mm_calls[-1] == {} and len(search.calls) == 1
    assert backends.env_enabled(None) and backends.env_enabled("1")
    assert not any(backends.env_enabled(v) for v in ("0", "off", "False", " no "))


def test_older_search_entry_point_and_a_failed_search(gpu_like, monkeypatch):
    search, mm_calls = gpu_like
    monkeypatch.delattr(torch._C, "_cusparselt")
    answers = iter([3, (4, 0)])
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: next(answers), raising=False)
    q, _ = _sparse_bf16()
    F.linear(torch.randn(5, 128, dtype=torch.bfloat16), q)
    F.linear(torch.randn(20, 128, dtype=torch.bfloat16), q)
    assert sorted(backends.algorithm_cache().values()) == [CsltAlgo(3), CsltAlgo(4)]
    assert mm_calls[-1] == {"alg_id": 4}  # split_k 1: torch's defaults for the rest
    failing = FakeSearch(RuntimeError("no plan"))
    failing.times = {4: 0.5}
    monkeypatch.setattr(torch._C, "_cusparselt", failing, raising=False)

    def timing(fn):
        fn()
        return failing.times.get(mm_calls[-1].get("alg_id", 0), 9.0)

    monkeypatch.setattr(cslt_algorithms, "_time_us", timing)
    x = torch.randn(100, 128, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuSPARSELt's search failed, lowbit's own timing still chose
        F.linear(x, q)
    F.linear(x, q)  # not retried: cached for that key
    assert failing.calls == [((128, 104), False, False, None)]
    assert mm_calls[-1] == {"alg_id": 4}
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad")))
    with pytest.warns(RuntimeWarning, match="algorithm search failed \\(bad\\)"):
        with pytest.raises(RuntimeError, match="bad"):
            F.linear(torch.randn(200, 128, dtype=torch.bfloat16), q)  # nothing runs: warned, the call fails


def test_compiled_call_uses_the_cached_algorithm(gpu_like):
    search, mm_calls = gpu_like
    q, _ = _sparse_bf16()
    model = nn.Sequential(nn.Linear(128, 64, bias=False))
    model[0].weight = nn.Parameter(q, requires_grad=False)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)  # eager: searches
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True)(x)
    assert torch.equal(got, want) and len(search.calls) == 1
    assert mm_calls[-1]["alg_id"] == 7


def test_auto_reads_each_formats_threshold(monkeypatch):
    seen = []
    real = backends.choose_path
    monkeypatch.setattr(backends, "choose_path", lambda *a: seen.append(a[3]) or real(*a))
    monkeypatch.setattr(backends, "SEMI_SPARSE_MIN_TOKENS", 77)
    monkeypatch.setattr(backends, "INT8_SEMI_SPARSE_MIN_TOKENS", 99)
    w = prune_24(torch.randn(32, 64))
    x = torch.randn(3, 64)
    F.linear(x, SemiSparseConfig().quantize_weight(w))
    F.linear(x, Int8DynamicActivationSemiSparseInt8WeightConfig().quantize_weight(w))
    assert seen == [77, 99]
    auto = KernelChoice.AUTO
    assert backends.choose_path(auto, True, 76, 77, backends.CUSPARSELT) is backends.Path.DENSE
    assert backends.choose_path(auto, True, 77, 77, backends.CUSPARSELT) is backends.Path.CUSPARSELT


# -- measured-speed helpers ------------------------------------------------------------------------
def _table(rows: dict[tuple[int, int], dict[int, tuple[float, float]]]) -> dict:
    """{(N, K): {M: (dense us, 2:4 us)}} as a compact bf16 table."""
    out = [
        {"N": n, "K": k, "M": m, "dense_bf16_us": d, "sparse_bf16_us": s}
        for (n, k), by_m in rows.items()
        for m, (d, s) in by_m.items()
    ]
    return {"device": "test GPU", "rows": out}


TABLE = _table(
    {
        (256, 128): {1: (10.0, 20.0), 128: (10.0, 12.5), 2048: (30.0, 20.0), 8192: (90.0, 50.0)},
        (128, 256): {1: (10.0, 12.0), 128: (10.0, 8.0), 2048: (30.0, 25.0), 8192: (90.0, 60.0)},
    }
)


def test_speedup_interpolates_conservatively_and_flags_unmeasured_shapes():
    est = speedup_vs_dense(256, 128, 2048, "bf16", TABLE)
    assert est.measured and est.speedup == pytest.approx(1.5) and est.device == "test GPU"
    assert speedup_vs_dense(256, 128, 4000, "bf16", TABLE).speedup == pytest.approx(1.5)  # min(1.5, 1.8)
    assert speedup_vs_dense(256, 128, 100_000, "bf16", TABLE).speedup == pytest.approx(1.8)
    assert speedup_vs_dense(256, 128, 1000, "bf16", TABLE).speedup == pytest.approx(0.8)
    other = speedup_vs_dense(512, 512, 2048, "bf16", TABLE)
    assert not other.measured and other.speedup == pytest.approx(1.2)  # the worst measured shape
    assert pays_off(256, 128, 8192, "bf16", 1.5, TABLE) and not pays_off(256, 128, 1, "bf16", table=TABLE)
    assert crossover_tokens(256, 128, "bf16", TABLE) == 2048
    assert crossover_tokens(128, 256, "bf16", TABLE) == 128  # loses at M=1
    assert crossover_tokens(1, 1, "bf16", TABLE) == 2048  # unmeasured: every shape must win
    assert speedup_vs_dense(256, 128, 1, "int8dq", TABLE).speedup is None  # no int8 rows
    assert crossover_tokens(256, 128, "int8dq", TABLE) is None
    with pytest.raises(ValueError, match=r"fmt='int4'; allowed: \['bf16', 'int8dq'\]"):
        speedup_vs_dense(256, 128, 1, "int4", TABLE)
    with pytest.raises(ValueError, match="tokens=0 must be >= 1"):
        speedup_vs_dense(256, 128, 0, "bf16", TABLE)


def test_packaged_table_and_table_from_results():
    table = speed.load_table()
    assert table["rows"] and table["device"]
    for r in table["rows"]:
        for fmt, (dense, sparse) in speed.FORMATS.items():
            if r.get(f"{dense}_us") and r.get(f"{sparse}_us"):
                est = speedup_vs_dense(r["N"], r["K"], r["M"], fmt)
                if fmt == "int8dq" and r["M"] >= TRITON_MIN_TOKENS:  # timed before the Triton W8A8 path
                    assert est.speedup is None and "Triton W8A8" in est.note and not est.pays()
                    continue
                assert est.measured and est.speedup == pytest.approx(r[f"{dense}_us"] / r[f"{sparse}_us"])
    result = {"device": "d", "torch": "t", "rows": [{"N": 1, "K": 2, "M": 3, "dense_bf16_us": 1.0, "x": 5}]}
    assert speed.table_from_results(result)["rows"] == [{"N": 1, "K": 2, "M": 3, "dense_bf16_us": 1.0}]
    assert speed.table_from_results(result)["cusparselt_algorithm"] == "0"
    result["rows"][0]["sparse_bf16_alg"] = {"alg_id": 2}
    assert speed.table_from_results(result)["cusparselt_algorithm"] == "searched"


def test_int8dq_rows_timed_before_the_triton_path_are_not_trusted(monkeypatch):
    rows = [{"N": 64, "K": 128, "M": m, "dense_int8dq_us": 100.0, "sparse_int8dq_us": 50.0}
            for m in (1, 16, 2048)]
    old = {"device": "g", "rows": rows}
    new = {**old, "dense_int8dq_triton_min_tokens": TRITON_MIN_TOKENS}
    assert speedup_vs_dense(64, 128, 1, "int8dq", old).speedup == 2.0  # torch._int_mm is still the dense path
    assert speedup_vs_dense(64, 128, 2048, "int8dq", old).speedup is None
    assert speedup_vs_dense(64, 128, 2048, "int8dq", new).speedup == 2.0
    assert crossover_tokens(64, 128, "int8dq", old) is None and crossover_tokens(64, 128, "int8dq", new) == 1
    assert not pays_off(64, 128, 2048, "int8dq", table=old) and pays_off(64, 128, 2048, "int8dq", table=new)
    assert speed.table_from_results({**new, "x": 1})["dense_int8dq_triton_min_tokens"] == TRITON_MIN_TOKENS
    monkeypatch.setattr(speed, "_packaged_table", lambda: old)
    report = sparsify_(nn.Sequential(nn.Linear(128, 64)), Int8DynamicActivationSemiSparseInt8WeightConfig(),
                       faster_at=2048)
    assert report.pruned == [] and "Triton W8A8" in report.skipped[0]


def test_sparsify_faster_at_skips_layers_the_table_says_lose(monkeypatch):
    monkeypatch.setattr(speed, "_packaged_table", lambda: TABLE)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        report = sparsify_(model, SemiSparseConfig(), faster_at=128)
    assert report.pruned == ["2"] and report.faster_from == {"2": 128}
    assert report.skipped == ["0 (2:4 bf16 is 0.80x dense at M=128 on test GPU)"]
    assert isinstance(model[2].weight, SemiSparseTensor) and not isinstance(model[0].weight, SemiSparseTensor)
    assert "2:4 faster from M=128" in str(report)
    report = sparsify_(nn.Sequential(nn.Linear(128, 256)), SemiSparseConfig(), faster_at=2048)
    assert report.pruned == ["0"] and not report.skipped
    for bad_cfg, bad in ((SemiSparsePruneConfig(), 128), (SemiSparseConfig(), 0), (SemiSparseConfig(), True)):
        with pytest.raises(ValueError, match="faster_at=.* must be a token count >= 1 with a 2:4 format"):
            sparsify_(nn.Sequential(nn.Linear(128, 256)), bad_cfg, faster_at=bad)


def test_timing_search_takes_the_fastest_algorithm_that_runs(gpu_like, monkeypatch):
    """lowbit times cuSPARSELt's own pick and alg ids 0..SEARCH_ALG_IDS-1 and keeps the fastest;
    ids that fail to run are skipped."""
    search, mm_calls = gpu_like
    search.times = {7: 5.0, 0: 9.0, 2: 3.0, 3: 0.5}
    fake_mm = torch._cslt_sparse_mm

    def mm(*a, **k):
        if k.get("alg_id") == 3:
            mm_calls.append({"alg_id": 3})
            raise RuntimeError("alg 3 does not exist for this problem")
        return fake_mm(*a, **k)

    monkeypatch.setattr(torch, "_cslt_sparse_mm", mm)
    q, w = _sparse_bf16()
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    y = F.linear(x, q)
    assert list(backends.algorithm_cache().values()) == [CsltAlgo(2)]
    assert mm_calls[-1] == {"alg_id": 2}
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=2**-7, atol=0.05)


def test_prefill_token_counts_take_the_n_by_m_result(gpu_like, monkeypatch):
    """From NM_RESULT_MIN_TOKENS padded tokens cuSPARSELt writes (N, M) and the caller gets the
    (M, N) transposed view; below, an (M, N) row-major result. Same numbers either way."""
    seen = []
    fake_mm = torch._cslt_sparse_mm

    def mm(*a, **k):
        seen.append(k["transpose_result"])
        return fake_mm(*a, **k)

    monkeypatch.setattr(torch, "_cslt_sparse_mm", mm)
    monkeypatch.setattr(backends, "NM_RESULT_MIN_TOKENS", 64)
    q, w = _sparse_bf16()
    for m, want_t in ((40, True), (70, False)):
        seen.clear()
        x = torch.randn(m, 128, dtype=torch.bfloat16)
        y = F.linear(x, q)
        assert set(seen) == {want_t} and y.shape == (m, 64)
        assert y.is_contiguous() == want_t
        torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=2**-7, atol=0.05)
    keys = backends.algorithm_cache()
    assert sorted(key.transpose_result for key in keys) == [False, True]


def test_chained_prefill_layers_take_the_previous_layers_transposed_output(gpu_like, monkeypatch):
    """From NM_RESULT_MIN_TOKENS a 2:4 linear returns an (M, N) transposed view; the next 2:4
    linear (after an elementwise op, which keeps that layout) must still work: 16-bit passes its
    contiguous x^T to cuSPARSELt, 8-bit copies x first (the stand-in asserts cuSPARSELt's rule)."""
    monkeypatch.setattr(backends, "NM_RESULT_MIN_TOKENS", 64)
    w1 = prune_24(torch.randn(128, 128))
    w2 = prune_24(torch.randn(64, 128))
    x = torch.randn(128, 128)
    for cfg in (SemiSparseConfig, Int8DynamicActivationSemiSparseInt8WeightConfig):
        dtype = torch.bfloat16 if cfg is SemiSparseConfig else torch.float32
        layers = []
        for w in (w1, w2):
            ref = cfg(kernel="reference").quantize_weight(w.to(dtype))
            packed, _ = backends.pack_for(backends.CUSPARSELT, ref.dense_values())
            extra = {} if cfg is SemiSparseConfig else dict(scale=ref.scale, block_size=ref.block_size,
                                                            act_quant=ref.act_quant)
            tensors = (ref.qdata, ref.meta) + ((extra.pop("scale"),) if extra else ())
            fast = type(ref)(*tensors, shape=ref.shape, dtype=ref.dtype, kernel=KernelChoice.TORCH,
                             packed=packed, backend=backends.CUSPARSELT, **extra)
            layers.append((fast, ref))
        xd = x.to(dtype)
        h = F.silu(F.linear(xd, layers[0][0]))
        assert not h.is_contiguous()  # the transposed layout reached the second layer
        got = F.linear(h, layers[1][0])
        want = F.linear(F.silu(F.linear(xd, layers[0][1])), layers[1][1])
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
