"""Probe: does an L2 bulk prefetch issued before a gap of small kernels speed up the next GEMV?

Decode at batch 1 alternates weight-streaming GEMVs with short latency-bound kernels (norms,
RoPE, attention, SwiGLU) during which HBM is idle. This probe models one such window inside a
CUDA graph:  evict L2 (read 128 MB) -> [prefetch the first P bytes of W into L2] -> GPU sleep
(the window) -> W4A8 stream GEMV on W, and times the whole graph (do_bench median) for several
P and window lengths. Saving = time(P=0) - time(P). Usage (GPU):

    python benchmarks/probe_l2_prefetch.py [--out results/probe_l2_prefetch_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from lowbit.kernels.prefetch import l2_prefetch
from lowbit.kernels.w4a8 import gemv_stream


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=20, rep=100, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda"
    evict = torch.ones(2**25, dtype=torch.float32, device=dev)  # 128 MB, read (clean lines)
    sink = torch.empty((), dtype=torch.float32, device=dev)
    rows = []
    for n, k in ((12288, 4096), (22016, 4096), (4096, 4096)):
        words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev)
        scale = torch.rand(n, 1, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        wbytes = words.numel() * 4
        flat = words.view(-1)

        def gemv():
            gemv_stream.stream(x, words, scale, None, out, 0, None)

        hot = graph_us(lambda: (gemv(), gemv())) - graph_us(gemv)
        for sleep_cycles in (0, 6000, 15000):
            base = None
            for mb in (0, 4, 8, 16, 24, 32):
                p = min(mb * 2**20, wbytes)
                for policy in ("normal", "evict_last") if mb else ("normal",):
                    def step(p=p, policy=policy):
                        torch.sum(evict, dim=0, out=sink)
                        if p:
                            l2_prefetch(flat, p, policy=policy)
                        if sleep_cycles:
                            torch.cuda._sleep(sleep_cycles)
                        gemv()
                    us = graph_us(step)
                    if mb == 0:
                        base = us
                    rows.append({"N": n, "K": k, "weight_mb": round(wbytes / 2**20, 1), "sleep_cycles": sleep_cycles,
                                 "prefetch_mb": round(p / 2**20, 1), "policy": policy, "us": round(us, 2),
                                 "saving_us": round(base - us, 2), "gemv_hot_l2_us": round(hot, 2)})
                    print(f"{n}x{k} sleep {sleep_cycles:6d} prefetch {p / 2**20:5.1f} MB {policy:10s} "
                          f"{us:8.2f} us  saving {base - us:6.2f}  (gemv twice - once, hot: {hot:.2f})", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("LOWBIT_GIT_SHA", "unknown"), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
