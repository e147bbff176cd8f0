"""Probe: does an L2 prefetch issued before a gap of small kernels speed up the next GEMV?

Decode at batch 1 alternates weight-streaming GEMVs with short latency-bound kernels (norms,
RoPE, attention, SwiGLU) during which HBM is idle. This probe models one such window inside a
CUDA graph:  evict L2 (read 128 MB) -> [prefetch the first P bytes of W into L2] -> GPU sleep
(the window) -> W4A8 stream GEMV on W, and times the whole graph (do_bench median) for several
P, window lengths and prefetch methods. Saving = time(P=0) - time(P). Methods: `bulk128` (128
bulk prefetches of 32 KB per program), `bulk_spread` (32 of 16 KB per program), `side` (bulk_spread
on a forked stream: a parallel branch of the graph, joined after the GEMV), `line` (one
prefetch.global.L2 per 128-byte line, 1024 lines per program). `alone` rows time
evict -> prefetch only. Usage (GPU):

    python benchmarks/probe_l2_prefetch.py [--out results/probe_l2_prefetch_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from lowbit.bench import cuda_graphed
from lowbit.kernels.w4a8 import gemv_stream

# -- L2 prefetch kernels (Hopper `cp.async.bulk.prefetch.L2`, `prefetch.global.L2`) ----------
PREFETCH_CHUNK = 32768  # bytes per bulk prefetch instruction


@triton.jit
def _bulk_prefetch(addr, nbytes, EVICT_LAST: tl.constexpr):
    """One `cp.async.bulk.prefetch.L2` per element: addr int64 byte addresses (16-aligned),
    nbytes int32 (a multiple of 16). Returns a dummy int32 (the asm must produce a value)."""
    if EVICT_LAST:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0;"
            " cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; } mov.u32 $0, 0;",
            "=r,l,r", [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;",
            "=r,l,r", [addr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(base, nbytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr):
    # base: int64 byte address; chunks past the end re-prefetch the last full chunk (harmless).
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    off = tl.minimum(idx.to(tl.int64) * CHUNK, nbytes - CHUNK)
    _bulk_prefetch(base + off, tl.full([BLOCK], CHUNK, tl.int32), EVICT_LAST)


@triton.jit
def _line_prefetch_kernel(base, nbytes, BLOCK: tl.constexpr):
    # one `prefetch.global.L2::evict_last` per 128-byte line; BLOCK lines per program
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    off = tl.minimum(idx.to(tl.int64) * 128, nbytes - 128)
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                              [base + off], dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(t: torch.Tensor, nbytes: int, policy: str = "normal", chunk: int = PREFETCH_CHUNK,
                block: int = 128, mode: str = "bulk") -> None:
    """Prefetch the first nbytes (rounded down to whole chunks) of t's storage into L2: `block`
    bulk prefetches of `chunk` bytes per program (mode "bulk"), or one per 128-byte line ("line")."""
    if policy not in ("normal", "evict_last"):
        raise ValueError(f"policy must be 'normal' or 'evict_last', got {policy!r}")
    if mode == "line":
        chunk = 128
    nbytes = min(nbytes, t.numel() * t.element_size()) // chunk * chunk
    if nbytes <= 0 or t.data_ptr() % 16:
        return
    chunks = nbytes // chunk
    grid = (triton.cdiv(chunks, block),)
    if mode == "line":
        _line_prefetch_kernel[grid](t.data_ptr(), nbytes, BLOCK=block, num_warps=4)
    else:
        _prefetch_kernel[grid](t.data_ptr(), nbytes, CHUNK=chunk, BLOCK=block,
                               EVICT_LAST=policy == "evict_last", num_warps=max(1, min(4, block // 32)))



METHODS = {"bulk128": dict(chunk=32768, block=128), "bulk_spread": dict(chunk=16384, block=32),
           "side": dict(chunk=16384, block=32), "line": dict(mode="line", block=1024)}


def graph_us(fn) -> float:
    return triton.testing.do_bench(cuda_graphed(fn), warmup=20, rep=100, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda"
    evict = torch.ones(2**25, dtype=torch.float32, device=dev)  # 128 MB, read (clean lines)
    sink = torch.empty((), dtype=torch.float32, device=dev)
    side = torch.cuda.Stream()
    rows = []
    for n, k in ((22016, 4096), (12288, 4096)):
        words = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev)
        scale = torch.rand(n, 1, device=dev, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        flat = words.view(-1)

        def gemv():
            gemv_stream.stream(x, words, scale, None, out, 0, None)

        def prefetch(p, method):
            kw = {k2: v for k2, v in METHODS[method].items()}
            if method == "side":
                main_s = torch.cuda.current_stream()
                side.wait_stream(main_s)
                with torch.cuda.stream(side):
                    l2_prefetch(flat, p, **kw)
            else:
                l2_prefetch(flat, p, **kw)

        def join(method):
            if method == "side":
                torch.cuda.current_stream().wait_stream(side)

        evict_us = graph_us(lambda: torch.sum(evict, dim=0, out=sink))
        for method in METHODS:
            for mb in (8, 16):
                us = graph_us(lambda: (torch.sum(evict, dim=0, out=sink), prefetch(mb * 2**20, method), join(method)))
                rows.append({"N": n, "K": k, "what": "alone", "method": method, "prefetch_mb": mb,
                             "us_minus_evict": round(us - evict_us, 2)})
                print(f"{n}x{k} alone {method:12s} {mb:3d} MB: {us - evict_us:7.2f} us over the evict", flush=True)
        for sleep_cycles in (0, 15000):
            def step(p, method):
                torch.sum(evict, dim=0, out=sink)
                if p:
                    prefetch(p, method)
                if sleep_cycles:
                    torch.cuda._sleep(sleep_cycles)
                gemv()
                join(method)
            base = graph_us(lambda: step(0, "bulk128"))
            for method in METHODS:
                for mb in (8, 16, 24):
                    us = graph_us(lambda: step(mb * 2**20, method))
                    rows.append({"N": n, "K": k, "what": "window", "sleep_cycles": sleep_cycles, "method": method,
                                 "prefetch_mb": mb, "us": round(us, 2), "base_us": round(base, 2),
                                 "saving_us": round(base - us, 2)})
                    print(f"{n}x{k} sleep {sleep_cycles:6d} {method:12s} {mb:3d} MB {us:8.2f} us "
                          f"(none {base:8.2f}) saving {base - us:6.2f}", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("LOWBIT_GIT_SHA", "unknown"), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
