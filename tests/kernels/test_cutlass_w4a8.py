"""CUTLASS W4A8 backend: build plumbing on any machine, numerics on a Hopper GPU.

CPU twins check what a CI machine can: lazy import, one-line errors that name the reason,
header detection with the fix command, the cache key. The GPU tests build (or load from cache)
the extension and compare it with the pure-PyTorch reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.core.kernel_choice import KernelChoice
from lowbit.formats.configs import Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig
from lowbit.formats.int4 import w4a8_linear_reference
from lowbit.kernels.cutlass import build, w4a8
from lowbit.testing.exact import power_of_two_case

REPO_SRC = str(Path(lowbit.__file__).resolve().parents[1])


def _sm90_blocker() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return build.device_blocker(torch.device("cuda")) or build.build_blocker()


GPU_SKIP = _sm90_blocker()
needs_sm90 = pytest.mark.skipif(GPU_SKIP is not None, reason=f"CUTLASS kernel cannot run: {GPU_SKIP}")


def _w4a8_weight(
    n: int,
    k: int,
    kernel: KernelChoice = KernelChoice.CUTLASS,
    group_size: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
):
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=group_size, kernel=kernel)
    return cfg.quantize_weight(torch.randn(n, k, dtype=dtype, device=device))


# -- CPU twins --------------------------------------------------------------------------------
def test_import_builds_nothing():
    code = (
        "import lowbit, lowbit.formats.int4, lowbit.kernels.cutlass.w4a8 as w, sys; "
        "from lowbit.kernels.cutlass import build; "
        "print(build.load.cache_info().currsize, 'torch.utils.cpp_extension' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": REPO_SRC},
    ).stdout.split()
    assert out == ["0", "False"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU twin of the GPU tests")
def test_explicit_cutlass_on_cpu_names_reason():
    w = _w4a8_weight(64, 128)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError) as e:
        torch.nn.functional.linear(x, w)
    msg = str(e.value)
    assert "\n" not in msg and "'cutlass'" in msg and "w4a8" in msg
    assert "CUDA tensor" in msg and "cpu" in msg


def test_group_wise_scales_rejected():
    reason = w4a8.unavailable_reason(torch.empty(2, 256, dtype=torch.bfloat16), 64, 256, 128, True)
    assert reason is not None and "per-row" in reason and "group_size=128" in reason
    assert w4a8.shape_unsupported(64, 256, 256) is None
    assert "K % 32" in w4a8.shape_unsupported(64, 48, 48)
    assert "N % 8" in w4a8.shape_unsupported(60, 64, 64)


def test_weight_only_and_asymmetric_rejected():
    cfg = Int4WeightOnlyConfig(group_size=None, kernel=KernelChoice.CUTLASS)
    w = cfg.quantize_weight(torch.randn(64, 128))
    with pytest.raises(RuntimeError, match="W4A8 only"):
        torch.nn.functional.linear(torch.randn(2, 128), w)
    x = torch.empty(2, 128, dtype=torch.bfloat16)
    assert "symmetric" in w4a8.unavailable_reason(x, 64, 128, 128, False)
    assert "fp16/bf16" in w4a8.unavailable_reason(x.float(), 64, 128, 128, True)


def test_missing_headers_gives_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CUTLASS_DIR", str(tmp_path))
    reason = build.missing_headers()
    assert reason is not None and build.FIX in reason and str(tmp_path) in reason
    assert build.build_blocker() is not None  # CPU torch or missing headers: both block
    for h in build.REQUIRED_HEADERS:  # a complete (fake) tree passes the check
        (tmp_path / h).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / h).write_text("")
    assert build.missing_headers() is None
    (tmp_path / build.REQUIRED_HEADERS[-1]).unlink()
    assert build.REQUIRED_HEADERS[-1] in build.missing_headers()


def test_cutlass_version_parsed(tmp_path):
    v = tmp_path / "include" / "cutlass" / "version.h"
    v.parent.mkdir(parents=True)
    v.write_text("#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR 2\n#define CUTLASS_PATCH 1\n")
    assert build.cutlass_version(tmp_path) == "4.2.1"
    assert build.cutlass_version(tmp_path / "nowhere") == "unknown"


def test_cache_key_changes_with_inputs(tmp_path, monkeypatch):
    base = ("2.11.0+cu130", "13.0", "sm_90a", "4.2.0", "abc")
    keys = {build.cache_key(*base)}
    for i, other in enumerate(("2.12.0", "12.8", "sm_100a", "3.8.0", "abd")):
        keys.add(build.cache_key(*base[:i], other, *base[i + 1 :]))
    assert len(keys) == 6 and build.cache_key(*base) == build.cache_key(*base)
    # the source hash covers every source file's bytes
    for name in build.SOURCES:
        (tmp_path / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
    h0 = build.source_hash(tmp_path)
    assert h0 == build.source_hash()
    (tmp_path / "w4a8_gemm.h").write_bytes(b"// changed\n")
    assert build.source_hash(tmp_path) != h0
    monkeypatch.setenv("LOWBIT_CUTLASS_CACHE", str(tmp_path / "cache"))
    assert build.cache_dir("k1") == tmp_path / "cache" / "k1"
    assert build.built_library("k1") is None
    (tmp_path / "cache" / "k1").mkdir(parents=True)
    (tmp_path / "cache" / "k1" / (build.module_name("k1") + ".so")).write_bytes(b"")
    assert build.built_library("k1") is not None


@pytest.mark.skipif(torch.version.cuda is not None, reason="CPU-build twin")
def test_load_on_cpu_torch_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(build.BuildError, match="CPU-only build"):
        build.load()
    assert time.perf_counter() - t0 < 1.0
    assert build.status()["blocker"] == "torch is a CPU-only build (torch.version.cuda is None)"


def test_auto_table_and_never_compiles(monkeypatch):
    # the measured table: CUTLASS for 5 <= M < 2048 on the listed shapes, nowhere else
    monkeypatch.setattr(build, "compiled", lambda: True)
    assert w4a8.auto_prefers_cutlass(22016, 4096, 16) and w4a8.auto_prefers_cutlass(4096, 11008, 2047)
    assert not w4a8.auto_prefers_cutlass(22016, 4096, 1)  # Triton's GEMV wins at M=1
    assert not w4a8.auto_prefers_cutlass(22016, 4096, 2048)
    assert not w4a8.auto_prefers_cutlass(4096, 4096, 128)  # not listed: measured slower
    # without a compiled extension AUTO never picks it (it would mean a compile inside a forward)
    monkeypatch.setattr(build, "compiled", lambda: False)
    assert not w4a8.auto_prefers_cutlass(22016, 4096, 16)
    monkeypatch.setattr(w4a8, "CUTLASS_AUTO_SHAPES", ((64, 128, 1, 64),))
    w = _w4a8_weight(64, 128, kernel=KernelChoice.AUTO)
    assert KernelChoice.CUTLASS not in w._available(torch.empty(4, 128, dtype=torch.bfloat16), True)


def test_mma_table_routes_auto_only(monkeypatch):
    # the mma decode-batch kernel on its measured entries; first <= M < end
    monkeypatch.setattr(build, "compiled", lambda: True)
    assert w4a8.auto_prefers_mma(4096, 11008, 2) and w4a8.auto_prefers_mma(4096, 11008, 16)
    assert not w4a8.auto_prefers_mma(4096, 11008, 1)  # the dp4a GEMV wins at one token
    assert not w4a8.auto_prefers_mma(4096, 11008, 17) and not w4a8.auto_prefers_mma(11008, 4096, 2)
    assert w4a8.auto_prefers_mma(4096, 4096, 32) and not w4a8.auto_prefers_mma(4096, 4096, 4)
    assert w4a8.auto_prefers_mma(12288, 4096, 3) and not w4a8.auto_prefers_mma(12288, 4096, 2)
    assert w4a8.auto_prefers_cutlass(4096, 11008, 2)  # the extension is taken for it
    auto = _w4a8_weight(64, 128, kernel=KernelChoice.AUTO)
    explicit = _w4a8_weight(64, 128)
    monkeypatch.setattr(w4a8, "MMA_AUTO_SHAPES", ((64, 128, 2, 9),))
    assert w4a8._takes_mma(auto, 8) and not w4a8._takes_mma(auto, 9) and not w4a8._takes_mma(auto, 1)
    assert not w4a8._takes_mma(explicit, 8)  # kernel=CUTLASS keeps the CUTLASS GEMM


def test_mma_grouped_table(monkeypatch):
    """Group-wise weights consult their own table, and only groups the kernel takes."""
    monkeypatch.setattr(build, "compiled", lambda: True)
    monkeypatch.setattr(w4a8, "MMA_AUTO_SHAPES_GROUPED", ((64, 256, 2, 9),))
    assert w4a8.auto_prefers_mma(64, 256, 4, 128) and not w4a8.auto_prefers_mma(64, 256, 4, None)
    assert not w4a8.auto_prefers_mma(64, 256, 4, 64)  # groups below 128
    assert w4a8.auto_prefers_cutlass(64, 256, 4, 128) and not w4a8.auto_prefers_cutlass(64, 256, 9, 128)
    x = torch.empty(4, 256, dtype=torch.bfloat16)
    assert "per-row" in w4a8.unavailable_reason(x, 64, 256, 128, True)  # the CUTLASS GEMM: per row only
    assert "per-row" not in w4a8.unavailable_reason(x, 64, 256, 128, True, mma=True)  # only the device
    assert "per-row" in w4a8.unavailable_reason(x, 64, 256, 64, True, mma=True)


def test_mma_route_agrees_for_symbolic_tokens(monkeypatch):
    """A compiled graph with a dynamic token count must take the kernel Int4Tensor's lookup chose:
    both compare the symbolic M against the same table entries."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    monkeypatch.setattr(build, "compiled", lambda: True)
    auto = _w4a8_weight(64, 128, kernel=KernelChoice.AUTO)
    monkeypatch.setattr(w4a8, "MMA_AUTO_SHAPES", ((64, 128, 2, 9),))
    monkeypatch.setattr(w4a8, "CUTLASS_AUTO_SHAPES", ())
    env = ShapeEnv()
    for m in (1, 4, 8, 9, 16):
        sym = env.create_symintnode(env.create_symbol(m, ConstantSource(f"m{m}")), hint=m)
        assert w4a8._takes_mma(auto, sym) == w4a8._takes_mma(auto, m) == (2 <= m < 9)
        assert w4a8.auto_prefers_cutlass(64, 128, sym) == (2 <= m < 9)


def test_compiled_needs_a_library(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_compiled_on_disk", build._compiled_on_disk.__wrapped__)
    monkeypatch.setattr(build, "ready", lambda: False)
    monkeypatch.setattr(build, "build_blocker", lambda: None)
    monkeypatch.setattr(build, "prebuilt_library", lambda: None)
    monkeypatch.setattr(build, "built_library", lambda key=None: None)
    assert not build.compiled()  # buildable, but AUTO must not be the one to build it
    monkeypatch.setattr(build, "built_library", lambda key=None: tmp_path / "x.so")
    assert build.compiled()
    monkeypatch.setattr(build, "build_blocker", lambda: "headers missing")
    assert not build.compiled()


# -- GPU -------------------------------------------------------------------------------------
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nk", [(256, 512), (4096, 4096), (11008, 4096)])
@pytest.mark.parametrize("m", [1, 7, 33, 300, 2048])
def test_matches_reference(m, nk, dtype):
    n, k = nk
    w = _w4a8_weight(n, k, device="cuda", dtype=dtype)  # quantized on the GPU: fast for 11008x4096
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    bias = torch.randn(n, dtype=dtype, device="cuda") if m % 2 else None
    y = torch.nn.functional.linear(x, w, bias)
    ref = w4a8_linear_reference(x, w, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    tol = ref.float().abs().max().item() * 1e-3
    torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=tol)


@needs_sm90
@pytest.mark.parametrize("m", [1, 33, 300])
def test_integer_accumulation_exact(m):
    """Power-of-two scales make the epilogue exact, so y is the int32 sum rounded once to bf16."""
    qa, sa, packed, sw, acc = power_of_two_case(m)
    y = w4a8.gemm(qa, sa, packed, sw, None, torch.bfloat16)
    assert acc.abs().max() < 2**24  # float32 holds it exactly, as the kernel's epilogue does
    expect = (acc.to(torch.float32) * 2.0**-8).to(torch.bfloat16)
    assert torch.equal(y.cpu(), expect)


@needs_sm90
def test_cached_load_in_new_process_is_fast():
    build.load()  # builds once if needed
    # a fresh process, import torch included (5.2 s once on a just-started machine); a rebuild takes 80-120 s
    assert build.cached_load_seconds() < 10.0


def test_build_blocker_chain(tmp_path, monkeypatch):
    """With a CUDA torch and complete headers, each missing piece is named in turn."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("LOWBIT_CUTLASS_DIR", str(tmp_path / "cutlass"))
    monkeypatch.setenv("LOWBIT_CUTLASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_CUTLASS_LIB", raising=False)
    for h in build.REQUIRED_HEADERS:
        (tmp_path / "cutlass" / h).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cutlass" / h).write_text("")
    monkeypatch.setattr(build, "nvcc_path", lambda: None)
    assert "nvcc not found" in build.build_blocker()
    monkeypatch.setattr(build, "nvcc_path", lambda: "/usr/bin/true")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert "ninja" in build.build_blocker() and build.FIX in build.build_blocker()
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/" + name)
    assert build.build_blocker() is None
    monkeypatch.setitem(build._FAILED, build.current_cache_key(), "CUTLASS W4A8 build failed in X: err\nmore")
    assert build.build_blocker().startswith("CUTLASS W4A8 build failed in X: err (full log")
    monkeypatch.setenv("LOWBIT_CUTLASS_LIB", str(tmp_path / "absent.so"))
    assert "does not exist" in build.build_blocker()


@needs_sm90
@pytest.mark.parametrize("m", [16, 300])
def test_compiled_quantizes_in_graph(m):
    """Compiled, the activations are quantized by graph ops (fused by Inductor into their producer)
    and handed to lowbit::w4a8_cutlass_gemm: same output as the eager call, bit for bit."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def fw(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    lin = torch.nn.Linear(4096, 11008, bias=False).to("cuda", torch.bfloat16)
    lowbit.quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=None, kernel=KernelChoice.CUTLASS))
    x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = lin(x)
        got = torch.compile(lin, backend=aot_autograd(fw_compiler=fw), fullgraph=True)(x)
        inductor = torch.compile(lin, fullgraph=True)(x)
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "lowbit.w4a8_cutlass_gemm.default" in ops and "aten.amax.default" in ops
    assert torch.equal(got, eager)
    assert torch.equal(inductor, eager)


# -- the mma.sync decode-batch kernel (w4a8_mma.cu) -------------------------------------------
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nk", [(8, 32), (40, 160), (136, 4192), (1000, 1056), (24, 11008)])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 32])
def test_mma_matches_reference_exactly(m, nk, dtype):
    """Integer sums in int32 and the reference's float roundings: equal bit for bit, for every
    launch shape (4, 8 or 16 warps, one CTA or a cluster of K splits, 1..3 weight rounds in flight)."""
    from lowbit.kernels.w4a8.act_quant import act_quant
    from lowbit.kernels.w4a8.reference import int8_gemm_ref, unpack_ref

    n, k = nk
    torch.manual_seed(m * 7 + n)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scale = torch.rand(n, 1, device="cuda") * 0.01 + 1e-3
    qa, sa = act_quant(torch.randn(m, k, dtype=dtype, device="cuda"))
    bias = torch.randn(n, dtype=dtype, device="cuda") if m % 2 else None
    ref = int8_gemm_ref(qa, sa, unpack_ref(packed), scale, bias, k, dtype)
    ran = 0
    for warps_n, split, depth in [(0, 0, 0), (4, 1, 1), (8, 2, 2), (8, 3, 3), (4, 8, 2), (16, 1, 2),
                                  (16, 4, 1), (8, 1, 3), (16, 4, 3)]:
        try:
            y = w4a8.mma_gemm(qa, sa, packed, scale, bias, dtype, 0, warps_n, split, depth)
        except RuntimeError as e:  # a split below the shared-memory minimum or past K/128
            assert "split must be in" in str(e)
            continue
        ran += 1
        assert y.dtype == dtype and y.shape == (m, n)
        assert torch.equal(y, ref), (warps_n, split, depth)
    assert ran >= 3


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nkg", [(24, 11008, 128), (24, 11008, 256), (136, 1024, 128), (1000, 768, 384)])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 32])
def test_mma_group_wise_matches_reference(m, nkg, dtype):
    """Group scales: each group's int32 sum scaled in float32 (groups split across the CTAs of a
    cluster included: K=768 asked for 4 splits runs 3 of 2 steps, which cut the 3-step groups);
    within float summation order."""
    from lowbit.kernels.w4a8.act_quant import act_quant
    from lowbit.kernels.w4a8.reference import int8_gemm_ref, unpack_ref

    n, k, group = nkg
    torch.manual_seed(m + n + group)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scale = torch.rand(n, k // group, device="cuda") * 0.01 + 1e-3
    qa, sa = act_quant(torch.randn(m, k, dtype=dtype, device="cuda"))
    bias = torch.randn(n, dtype=dtype, device="cuda") if m % 2 else None
    ref = int8_gemm_ref(qa, sa, unpack_ref(packed), scale, bias, group, torch.float32)
    row_ref = int8_gemm_ref(qa, sa, unpack_ref(packed), scale[:, :1], bias, k, torch.float32)
    ran = 0
    for warps_n, split, depth in [(0, 0, 0), (4, 1, 1), (8, 2, 2), (8, 4, 3), (16, 1, 2)]:
        try:
            y = w4a8.mma_gemm(qa, sa, packed, scale, bias, dtype, group, warps_n, split, depth)
        except RuntimeError as e:
            assert "split must be in" in str(e)
            continue
        ran += 1
        torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=ref.abs().max().item() * 2e-3)
        assert not torch.allclose(y.float(), row_ref, rtol=0.05)  # the group scales are really applied
    assert ran >= 2


@needs_sm90
def test_mma_rejects_bad_input():
    qa = torch.zeros(33, 256, dtype=torch.int8, device="cuda")
    sa = torch.ones(33, 1, device="cuda")
    packed = torch.zeros(64, 128, dtype=torch.uint8, device="cuda")
    scale = torch.ones(64, 1, device="cuda")
    with pytest.raises(RuntimeError, match="1..32 tokens"):
        w4a8.mma_gemm(qa, sa, packed, scale, None, torch.bfloat16)
    with pytest.raises(RuntimeError, match="N % 8 == 0"):
        w4a8.mma_gemm(qa[:4], sa[:4], packed[:60], scale[:60], None, torch.bfloat16)
    with pytest.raises(RuntimeError, match="split must be in"):
        w4a8.mma_gemm(qa[:4], sa[:4], packed, scale, None, torch.bfloat16, 0, 8, 3)  # K=256: two steps
    with pytest.raises(RuntimeError, match="multiple of 128"):
        w4a8.mma_gemm(qa[:4], sa[:4], packed, torch.ones(64, 4, device="cuda"), None, torch.bfloat16, 64)
    with pytest.raises(RuntimeError, match="weight scale size"):
        w4a8.mma_gemm(qa[:4], sa[:4], packed, torch.ones(64, 3, device="cuda"), None, torch.bfloat16, 128)
    with pytest.raises(RuntimeError, match="warps_n"):
        w4a8.mma_gemm(qa[:4], sa[:4], packed, scale, None, torch.bfloat16, 0, 5, 1)
    with pytest.raises(RuntimeError, match="depth must be"):
        w4a8.mma_gemm(qa[:4], sa[:4], packed, scale, None, torch.bfloat16, 0, 8, 1, 4)
    with pytest.raises(RuntimeError, match="warps_n"):  # checked before the default split divides by it
        w4a8.mma_gemm(qa[:4, :256], sa[:4], packed[:8], scale[:8], None, torch.bfloat16, 0, -1)
    with pytest.raises(RuntimeError, match="does not match"):
        w4a8.mma_gemm(qa[:4, :128], sa[:4], packed, scale, None, torch.bfloat16)
    long_k = torch.zeros(32, 65536, dtype=torch.int8, device="cuda")  # slice too big even at 8 splits
    with pytest.raises(RuntimeError, match="too long for 32 tokens"):
        w4a8.mma_gemm(long_k, torch.ones(32, 1, device="cuda"), torch.zeros(8, 32768, dtype=torch.uint8,
                                                                              device="cuda"),
                      torch.ones(8, 1, device="cuda"), None, torch.bfloat16)
    bias = torch.randn(64, dtype=torch.bfloat16, device="cuda")
    empty_k = w4a8.mma_gemm(qa[:4, :0], sa[:4], packed[:, :0], scale, bias, torch.bfloat16)
    assert torch.equal(empty_k, bias.expand(4, 64))  # an empty sum: the bias alone


@needs_sm90
@pytest.mark.parametrize("nkg", [(136, 4192, 0), (4096, 4096, 0), (4096, 11008, 0), (136, 4224, 128),
                                 (4096, 11008, 128)])
@pytest.mark.parametrize("m", [1, 7, 16, 32])
def test_mma_pdl_after_triggering_act_quant(m, nkg):
    """Programmatic dependent launch: act_quant lets the kernel start at once, the kernel streams its
    first weight rounds and then waits for qa / sa. Outputs equal the reference bit for bit (per
    row; group-wise: the plain launch's output, checked against the reference elsewhere) for fresh
    activations every call, eagerly and replayed in a CUDA graph (a kernel that read qa before the
    wait would see the previous call's values; removing the wait failed 9 of 12 per-row cases)."""
    from lowbit.kernels.w4a8.act_quant import act_quant, pdl_trigger_ok
    from lowbit.kernels.w4a8.reference import int8_gemm_ref, unpack_ref

    n, k, group = nkg
    torch.manual_seed(m + n + group)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    scale = (torch.rand(n, k // group if group else 1, device="cuda") * 0.01 + 1e-3).to(torch.bfloat16)
    x = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")
    assert pdl_trigger_ok(x)

    def call():
        qa, sa = act_quant(x, trigger_dependents=True)
        return w4a8.mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, group, pdl=True)

    def expect():
        qa, sa = act_quant(x)
        if group:
            torch.cuda.synchronize()
            return w4a8.mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, group)
        return int8_gemm_ref(qa, sa, unpack_ref(packed), scale.float(), None, k, torch.bfloat16)

    for i in range(3):
        x.copy_(torch.randn(m, k, dtype=torch.bfloat16, device="cuda") * (i + 1))
        assert torch.equal(call(), expect()), f"eager call {i}"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for i in range(3):
        x.copy_(torch.randn(m, k, dtype=torch.bfloat16, device="cuda") * (i + 2))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect()), f"graph replay {i}"


@needs_sm90
def test_eager_auto_mma_launches_with_pdl(monkeypatch):
    """An eager AUTO call on the mma route quantizes with a triggering act_quant and launches the
    kernel with PDL; PDL_EAGER = False gives plain launches and the same output."""
    from lowbit.kernels.w4a8 import act_quant as aq

    build.load()
    seen = []
    real_mma, real_aq = w4a8.mma_gemm, aq.act_quant
    monkeypatch.setattr(w4a8, "mma_gemm",
                        lambda *a, **kw: seen.append(("mma", kw.get("pdl"))) or real_mma(*a, **kw))
    monkeypatch.setattr(aq, "act_quant", lambda *a, **kw: seen.append(("aq", kw.get("trigger_dependents")))
                        or real_aq(*a, **kw))
    lin = torch.nn.Linear(11008, 4096, bias=True).to("cuda", torch.bfloat16)
    lowbit.quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=None))
    x = torch.randn(16, 11008, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        with_pdl = lin(x)
        assert seen == [("aq", True), ("mma", True)]
        seen.clear()
        monkeypatch.setattr(w4a8, "PDL_EAGER", False)
        plain = lin(x)
        assert seen == [("aq", False), ("mma", False)]
    assert torch.equal(with_pdl, plain)


@needs_sm90
def test_auto_takes_mma_eager_and_compiled(monkeypatch):
    """On a MMA_AUTO_SHAPES entry an AUTO weight runs the mma kernel: eagerly (spied) and as
    lowbit::w4a8_mma in a compiled graph, with the same output bit for bit."""
    from torch._dynamo.backends.common import aot_autograd

    build.load()
    calls = []
    real = w4a8.mma_gemm
    monkeypatch.setattr(w4a8, "mma_gemm", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    lin = torch.nn.Linear(11008, 4096, bias=True).to("cuda", torch.bfloat16)
    lowbit.quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=None))
    x = torch.randn(4, 11008, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = lin(x)
        assert calls == [4]
        torch.testing.assert_close(eager.float(), w4a8_linear_reference(x, lin.weight, lin.bias).float(),
                                   rtol=2**-7, atol=eager.float().abs().max().item() * 1e-3)
        torch._dynamo.reset()
        graphs = []

        def fw(gm, _inputs):
            graphs.append(gm)
            return gm.forward

        got = torch.compile(lin, backend=aot_autograd(fw_compiler=fw), fullgraph=True)(x)
    ops = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "lowbit.w4a8_mma.default" in ops and "lowbit.w4a8_cutlass_gemm.default" not in ops
    assert torch.equal(got, eager)


@needs_sm90
def test_auto_takes_mma_for_group_wise_weights(monkeypatch):
    build.load()
    monkeypatch.setattr(w4a8, "MMA_AUTO_SHAPES_GROUPED", ((4096, 11008, 2, 17),))
    calls = []
    real = w4a8.mma_gemm
    monkeypatch.setattr(w4a8, "mma_gemm", lambda *a, **kw: calls.append(a[6]) or real(*a, **kw))
    lin = torch.nn.Linear(11008, 4096, bias=False).to("cuda", torch.bfloat16)
    lowbit.quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=128))
    x = torch.randn(8, 11008, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        y = lin(x)
    assert calls == [128]
    ref = w4a8_linear_reference(x, lin.weight, None)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=ref.float().abs().max().item() * 2e-3)


@needs_sm90
@pytest.mark.parametrize("group", [0, 128])
def test_mma_reads_half_scales_as_stored(group):
    """bf16 / fp16 weight scales are read as stored and widened in the kernel (exact): the output is
    the float32-scale output bit for bit, for one and two token tiles, split or not, every depth."""
    from lowbit.kernels.w4a8.act_quant import act_quant

    n, k = 136, 1024
    torch.manual_seed(group + 3)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    cols = 1 if group == 0 else k // group
    for m, launch in ((7, (0, 0, 0)), (7, (8, 4, 3)), (20, (16, 2, 1)), (32, (4, 1, 2))):
        qa, sa = act_quant(torch.randn(m, k, dtype=torch.bfloat16, device="cuda"))
        for dt in (torch.bfloat16, torch.float16):
            scale = (torch.rand(n, cols, device="cuda") * 0.01 + 1e-3).to(dt)
            y = w4a8.mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, group, *launch)
            f32 = w4a8.mma_gemm(qa, sa, packed, scale.float(), None, torch.bfloat16, group, *launch)
            assert torch.equal(y, f32), (m, launch, dt)


@needs_sm90
@pytest.mark.parametrize("route", ["mma", "cutlass"])
def test_w4a8_under_cudagraph_trees(monkeypatch, route):
    """torch.compile(mode="reduce-overhead") with no eager call first: the extension's ops keep no
    allocation made while CUDA graphs warm up or record (cudagraph trees reject untracked tensors in
    their pool), and the replayed output equals eager."""
    from torch._dynamo.utils import counters

    ext = build.load()
    calls = []
    name = "w4a8_mma" if route == "mma" else "w4a8_gemm"
    real = getattr(ext, name)
    monkeypatch.setattr(ext, name, lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(w4a8, "MMA_AUTO_SHAPES", ((256, 512, 2, 17),) if route == "mma" else ())
    monkeypatch.setattr(w4a8, "CUTLASS_AUTO_SHAPES", ((256, 512, 2, 2048),))
    torch._dynamo.reset()
    counters.clear()
    lin = torch.nn.Linear(512, 256, bias=False).to("cuda", torch.bfloat16)
    lowbit.quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=None))
    assert lin.weight.scale.dtype == torch.bfloat16  # stored in bf16: a float32 copy would be new memory
    f = torch.compile(lin, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(8, 512, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            y = f(x).clone()
        eager = lin(x)
    torch._dynamo.reset()
    assert calls and set(calls) == {8}, calls  # the route under test ran (warm-up and recording)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])  # graphs were used
    torch.testing.assert_close(y.float(), eager.float(), rtol=2**-7,
                               atol=eager.float().abs().max().item() * 1e-3)


def test_prebuilt_library_from_other_sources_is_refused(monkeypatch, tmp_path):
    """A LOWBIT_CUTLASS_LIB built from older sources (entry points with other arguments) is refused
    at load with the fix, instead of failing later on a call."""
    import types

    lib = tmp_path / "lowbit_w4a8_old.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("LOWBIT_CUTLASS_LIB", str(lib))
    monkeypatch.setattr(build, "build_blocker", lambda: None)
    monkeypatch.setattr(build, "_import_library", lambda path, name: types.SimpleNamespace())
    build.load.cache_clear()
    try:
        with pytest.raises(build.BuildError, match="API version 1, this lowbit needs 2"):
            build.load()
        monkeypatch.setattr(build, "_import_library",
                            lambda path, name: types.SimpleNamespace(api_version=build.API_VERSION))
        build.load.cache_clear()
        assert build.load().api_version == build.API_VERSION
    finally:
        build.load.cache_clear()
