"""Build, check and time the CUTLASS W4A8 kernel on a Hopper GPU.

Usage (GPU machine):  python benchmarks/check_cutlass.py [--fresh] [--quick] [--out FILE.json]

1. builds the extension (timed; --fresh builds into an empty cache dir), or exits 1 with the
   compiler log's tail if the build fails;
2. correctness vs the pure-PyTorch reference (M in 1, 7, 33, 300, 2048; bf16 and fp16; bias) and
   an exact integer-accumulation check;
3. loads the cached build in a new process (timed);
4. times Triton W4A8 (auto and prefill paths), CUTLASS (with and without its activation
   quantization), bf16 F.linear and torch._int_mm on Llama-2-7B shapes as CUDA-graph replays with
   the L2 flushed (bench_linear's timing helper); prints a table, writes JSON ($OUT/cutlass_h100.json
   by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import timeit_graphed  # noqa: E402

import lowbit  # noqa: E402
from lowbit.bench import git_sha  # noqa: E402
from lowbit.formats.int4 import w4a8_linear_reference  # noqa: E402
from lowbit.kernels.cutlass import build, w4a8  # noqa: E402
from lowbit.testing.exact import power_of_two_case  # noqa: E402

SHAPES = {
    "qkv_proj": (12288, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (22016, 4096),
    "down_proj": (4096, 11008),
}
CHECK_SHAPES = ((256, 512), (4096, 4096), (11008, 4096))
CHECK_M = (1, 7, 33, 300, 2048)
BENCH_M = (1, 16, 128, 2048, 8192)


def build_step() -> dict:
    reason = build.device_blocker(torch.device("cuda")) or build.build_blocker()
    if reason is not None:
        sys.exit(f"CUTLASS backend unusable here: {reason}")
    cached = build.built_library() is not None
    t0 = time.perf_counter()
    try:
        build.load(verbose=False)
    except build.BuildError as e:
        print(str(e)[-4000:], file=sys.stderr)
        sys.exit(1)
    secs = time.perf_counter() - t0
    print(f"{'loaded cached build' if cached else 'built'} in {secs:.1f} s ({build.cache_dir()})", flush=True)
    return {"was_cached": cached, "seconds": round(secs, 2), "cache_dir": str(build.cache_dir())}


def cached_load_step() -> float:
    try:
        secs = build.cached_load_seconds()
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        return float("nan")
    print(f"cached load in a new process (incl. import torch): {secs:.2f} s", flush=True)
    return secs


def correctness_step(quick: bool) -> tuple[list[dict], bool]:
    rows, ok = [], True
    for n, k in CHECK_SHAPES[:1] if quick else CHECK_SHAPES:
        for dtype in (torch.bfloat16, torch.float16):
            cfg = lowbit.W4A8Config(group_size=None, kernel=lowbit.KernelChoice.CUTLASS)
            w = cfg.quantize_weight(torch.randn(n, k, dtype=dtype, device="cuda"))
            for m in CHECK_M:
                x = torch.randn(m, k, dtype=dtype, device="cuda")
                bias = torch.randn(n, dtype=dtype, device="cuda") if m % 2 else None
                ref = w4a8_linear_reference(x, w, bias).float()
                try:
                    y = F.linear(x, w, bias).float()
                    err = (y - ref).abs()
                    bound = 2**-7 * ref.abs() + 1e-3 * ref.abs().max()
                    row_ok = bool((err <= bound).all())
                    row = {
                        "N": n,
                        "K": k,
                        "M": m,
                        "dtype": str(dtype)[6:],
                        "bias": bias is not None,
                        "max_abs_err": err.max().item(),
                        "ref_absmax": ref.abs().max().item(),
                        "ok": row_ok,
                    }
                except Exception as e:
                    row = {
                        "N": n,
                        "K": k,
                        "M": m,
                        "dtype": str(dtype)[6:],
                        "ok": False,
                        "error": f"{type(e).__name__}: {e}",
                    }
                ok &= row["ok"]
                rows.append(row)
                if not row["ok"]:
                    print(f"MISMATCH {row}", flush=True)
    for m in (1, 33, 300):  # exact: power-of-two scales, y is the int32 sum rounded once
        qa, sa, packed, sw, acc = power_of_two_case(m)
        y = w4a8.gemm(qa, sa, packed, sw, None, torch.bfloat16)
        exact = torch.equal(y.cpu(), (acc.to(torch.float32) * 2.0**-8).to(torch.bfloat16))
        rows.append({"N": packed.shape[0], "K": qa.shape[1], "M": m, "check": "integer_exact", "ok": exact})
        ok &= exact
    print(f"correctness: {sum(r['ok'] for r in rows)}/{len(rows)} ok", flush=True)
    return rows, ok


def timing_step(quick: bool) -> list[dict]:
    import lowbit.kernels.w4a8.op  # noqa: F401  (registers torch.ops.lowbit.int4_linear)

    rows = []
    for label, (n, k) in list(SHAPES.items())[:1] if quick else SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        qt = lowbit.W4A8Config(group_size=None).quantize_weight(w)
        qc = lowbit.W4A8Config(group_size=None, kernel=lowbit.KernelChoice.CUTLASS).quantize_weight(w)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda").t()

        def triton_path(p):
            return lambda x: torch.ops.lowbit.int4_linear(
                x, qt.qdata, qt.scale, None, None, qt.group_size, False, True, p
            )

        for m in BENCH_M[:3] if quick else BENCH_M:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            qa, sa = w4a8._quantize(x)
            qa_mm = qa if m > 16 else F.pad(qa, (0, 0, 0, 17 - m))  # torch._int_mm needs M > 16
            impls = {
                "bf16": lambda x: F.linear(x, w),
                "triton_auto": triton_path("auto"),
                "triton_prefill": triton_path("prefill"),
                "cutlass": lambda x: F.linear(x, qc),
                "cutlass_gemm_alone": lambda x: w4a8.gemm(qa, sa, qc.qdata, qc.scale, None, x.dtype),
                "int_mm_alone": lambda x: torch._int_mm(qa_mm, w8),
            }
            for name, fn in impls.items():
                if name == "triton_prefill" and m < 16:
                    continue
                try:
                    us = timeit_graphed(lambda: fn(x))
                except Exception as e:
                    print(f"{name} {n}x{k} M={m}: {type(e).__name__}: {e}", flush=True)
                    continue
                rows.append(
                    {
                        "shape": label,
                        "N": n,
                        "K": k,
                        "M": m,
                        "impl": name,
                        "us": round(us, 2),
                        "tops": round(2 * m * n * k / us / 1e6, 1),
                    }
                )
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["bf16", "int_mm_alone", "triton_auto", "triton_prefill", "cutlass", "cutlass_gemm_alone"]
    by = {(r["N"], r["K"], r["M"], r["impl"]): r["us"] for r in rows}
    print(
        "us, CUDA graph, L2 flushed\nNxK M | " + " ".join(f"{c[:12]:>12}" for c in cols) + " | triton/cutlass"
    )
    for n, k, m in sorted({(r["N"], r["K"], r["M"]) for r in rows}):
        vals = [by.get((n, k, m, c)) for c in cols]
        cells = " ".join(f"{v:12.1f}" if v else "           -" for v in vals)
        ratio = f"{vals[2] / vals[4]:5.2f}x" if vals[2] and vals[4] else ""
        print(f"{n}x{k} {m} | {cells} | {ratio}")


def nvcc_version() -> str | None:
    nvcc = build.nvcc_path()
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", action="store_true", help="build into an empty cache dir (times a cold build)")
    ap.add_argument("--quick", action="store_true", help="one shape, fewer M")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cutlass_h100.json"))
    args = ap.parse_args()
    if args.fresh:
        os.environ["LOWBIT_CUTLASS_CACHE"] = tempfile.mkdtemp(prefix="lowbit_cutlass_")
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "cutlass": build.cutlass_version(),
        "nvcc": nvcc_version(),
        "git_sha": git_sha() or "unknown",
        "cache_key": build.current_cache_key(),
    }
    print(json.dumps(meta), flush=True)
    meta["build"] = build_step()
    meta["cached_load_seconds"] = cached_load_step()
    checks, ok = correctness_step(args.quick)
    rows = timing_step(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"meta": meta, "correct": ok, "checks": checks, "rows": rows}, indent=1)
    )
    print_table(rows)
    print(f"wrote {args.out}")
    sys.exit(0 if ok else 2)


if __name__ == "__main__":
    main()
