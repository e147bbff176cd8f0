"""kernels/launch.py: the cached re-launch runs exactly the kernel `fn[grid]` would run.

CPU: a stand-in JIT function checks the cache key (what Triton specializes on) and the argument
order of the re-launch. GPU: real kernels give bit-identical results with the cache on and off,
across inputs that change Triton's specialization (misaligned views, strides, token counts).
"""

from __future__ import annotations

import pytest
import torch

from lowbit.kernels import launch as L

ON_GPU = torch.cuda.is_available()


class _Param:
    def __init__(self, constexpr: bool):
        self.is_constexpr = constexpr


class JITFunction:  # the name launch() checks
    def __init__(self):
        self.arg_names = ["x", "n", "B", "C"]
        self.params = [_Param(False), _Param(False), _Param(True), _Param(True)]
        self.compiles: list = []
        self.runs: list = []

    def __getitem__(self, grid):
        def first(*args, **kw):
            self.compiles.append((grid, args, kw))
            return _Compiled(self)
        return first


class _Compiled:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.fn.runs.append((grid, args, stream))


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(L, "fast_launch_enabled", lambda: True)

    class _S:
        cuda_stream = 7

    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: _S())
    L.cache_clear()
    yield JITFunction()
    L.cache_clear()


def test_second_call_reuses_the_compiled_kernel(fake):
    x = torch.zeros(64)
    L.launch(fake, (4,), x, 32, 8, C=2, num_warps=4)
    L.launch(fake, (4,), x, 48, 8, C=2, num_warps=4)  # 48: still divisible by 16, != 1
    assert len(fake.compiles) == 1
    assert fake.runs == [((4, 1, 1), (x, 48, 8, 2), 7)]  # 3-d grid; positional args, then the constexprs


@pytest.mark.parametrize("change", ["int_is_one", "int_not_div16", "misaligned", "dtype", "constexpr_pos",
                                    "constexpr_kw", "option", "grid", "big_int"])
def test_a_specialization_change_compiles_again(fake, change):
    x = torch.zeros(64)
    L.launch(fake, (4,), x, 32, 8, C=2, num_warps=4)
    args, kw, grid = [x, 32, 8], dict(C=2, num_warps=4), (4,)
    if change == "int_is_one":
        args[1] = 1
    elif change == "int_not_div16":
        args[1] = 33
    elif change == "misaligned":
        args[0] = x[1:]  # 4-byte offset
    elif change == "dtype":
        args[0] = x.half()
    elif change == "constexpr_pos":
        args[2] = 16  # a constexpr passed by position keys by value
    elif change == "constexpr_kw":
        kw["C"] = 3
    elif change == "option":
        kw["num_warps"] = 8
    elif change == "grid":
        grid = (5,)
    elif change == "big_int":
        args[1] = 2**32
    L.launch(fake, grid, *args, **kw)
    assert len(fake.compiles) == 2 and fake.runs == []


def test_disabled_or_unusual_calls_take_the_plain_launch(fake, monkeypatch):
    x = torch.zeros(64)
    L.launch(fake, lambda meta: (4,), x, 32, 8, C=2)  # a callable grid
    L.launch(fake, lambda meta: (4,), x, 32, 8, C=2)
    L.launch(fake, (4,), x, 32, 8)  # a constexpr missing: not cached (Triton would raise)
    L.launch(fake, (4,), x, 32, 8)
    assert len(fake.compiles) == 4 and fake.runs == []
    monkeypatch.setattr(L, "fast_launch_enabled", lambda: False)
    L.launch(fake, (4,), x, 32, 8, C=2)
    L.launch(fake, (4,), x, 32, 8, C=2)
    assert len(fake.compiles) == 6 and fake.runs == []


def test_env_switch(monkeypatch):
    monkeypatch.setenv("LOWBIT_FAST_LAUNCH", "0")
    assert not L.fast_launch_enabled()


@pytest.mark.skipif(not ON_GPU, reason="real Triton launches need a CUDA GPU (CPU: the stand-in tests above)")
def test_real_kernels_identical_with_and_without_the_cache(monkeypatch):
    import torch.nn.functional as F

    import lowbit
    from lowbit.kernels import fused

    torch.manual_seed(0)
    cases = []
    for n, k in ((4096, 4096), (1024, 11008), (352, 512)):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for cfg in (lowbit.W4A8Config(group_size=None), lowbit.W4A8Config(group_size=128),
                    lowbit.Int4WeightOnlyConfig(group_size=128)):
            qw = cfg.quantize_weight(w)
            for m in (1, 3, 16, 100):
                base = torch.randn(m * k + 8, device="cuda", dtype=torch.bfloat16)
                x_al = base[: m * k].view(m, k)
                x_mis = base[1: m * k + 1].view(m, k)  # 2-byte offset: not 16-byte aligned
                cases.append((qw, x_al, x_mis))
    rms_w = torch.rand(4096, device="cuda", dtype=torch.bfloat16)

    def run_all():
        outs = []
        for qw, x_al, x_mis in cases:
            for x in (x_al, x_mis, x_al):  # aligned, misaligned, aligned again (cache hits)
                outs.append((x.shape[0], F.linear(x, qw)))
        for m in (1, 5):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            outs.append((m, fused.rms_norm(x, rms_w, 1e-5)))
        return outs

    L.cache_clear()
    monkeypatch.setenv("LOWBIT_FAST_LAUNCH", "1")
    torch.manual_seed(1)
    fast = run_all()
    assert len(L._CACHE) > 0  # the cache was used
    monkeypatch.setenv("LOWBIT_FAST_LAUNCH", "0")
    torch.manual_seed(1)
    plain = run_all()
    for (m, a), (_, b) in zip(fast, plain):
        if m <= 4:  # one-program-per-output kernels: bit-identical
            assert torch.equal(a, b)
        else:  # split-K decode sums partials with fp32 atomics: order varies run to run
            tol = 1e-2 * b.float().abs().max().item()
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=tol)
