"""Probe: host (CPU) time of one eager quantized linear call, layer by layer down the call stack.

A decode GEMV takes ~6-20 us on the GPU; an eager call that costs more host time than that leaves
the GPU idle. This times 2000 back-to-back calls (no sync inside the loop, so the figure is
host time whenever host > GPU) at M=1 for each level of the W4A8 per-row call stack, from
F.linear on the quantized weight down to the raw Triton launch, next to bf16 F.linear and torch's
tinygemm, then prints a cProfile of the top level. Usage (GPU):

    python benchmarks/probe_eager_overhead.py [--n 4096 --k 4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import torch.nn.functional as F
import triton
from bench_linear import tinygemm_weight

import lowbit
from lowbit.kernels.w4a8 import gemv_stream, op
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, k = args.n, args.k
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    qw = lowbit.W4A8Config(group_size=None).quantize_weight(w)
    wp, sz, _ = tinygemm_weight(w)
    words = qw.qdata.view(torch.int32)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    cfg = gemv_stream.stream_config(1, n, k)
    levels = {
        "bf16 F.linear": lambda: F.linear(x, w),
        "tinygemm _weight_int4pack_mm": lambda: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz),
        "w4a8 F.linear(x, qw)": lambda: F.linear(x, qw),
        "w4a8 qw._linear": lambda: qw._linear(x, None),
        "w4a8 op.int4_linear": lambda: op.int4_linear(x, qw, None, True),
        "w4a8 op._int4_linear_impl": lambda: op._int4_linear_impl(x, qw.qdata, qw.scale, None, None, qw.group_size,
                                                                  False, True, "auto"),
        "w4a8 w4a8_gemv_dp4a": lambda: w4a8_gemv_dp4a(x, qw.qdata, qw.scale, None, qw.group_size),
        "w4a8 gemv_stream.stream (raw launch)": lambda: gemv_stream.stream(x, words, qw.scale, None, out, 0, cfg),
    }
    res = {name: round(per_call_us(fn), 2) for name, fn in levels.items()}
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        F.linear(x, qw)
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue()[-9000:])
    print(f"{n}x{k} M=1, host+GPU us per call (2000 calls back to back):")
    for name, us in res.items():
        print(f"  {name:40s} {us:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "git_sha": os.environ.get("LOWBIT_GIT_SHA", "unknown"), "N": n, "K": k, "M": 1,
                       "us_per_call": res}, f, indent=1)


if __name__ == "__main__":
    main()
