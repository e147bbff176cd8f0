"""Probe: the fastest a bare read of a W4A8 weight's bytes can be timed, next to the M=1 kernels.

The M=1 acceptance numbers are do_bench medians with L2 flushed. do_bench flushes by zeroing a
256 MB buffer, which leaves L2 full of dirty lines: the timed kernel's first reads evict them and
HBM spends part of the kernel's time writing them back. This probe times, per Llama-2-7B M=1
shape and in one run:
  - lowbit W4A8 per row (F.linear on the quantized weight), torch tinygemm W4A16 g128 and bf16
    cuBLAS, each called eagerly and as a CUDA-graph replay (`_graphed`, no host time);
  - `read_floor`: the best of 48 configs of a Triton kernel that only reads the packed weight
    and its scales (same bytes as W4A8 per row) and XORs them into one word per program;
under three timings: do_bench (dirty flush), the same loop with a dirty flush written out here
(`dirty`, a check of the first), and with a clean flush (`clean`: L2 filled by *reading* 256 MB).

    python benchmarks/probe_read_floor.py [--out results/probe_read_floor_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_linear import tinygemm_weight

import lowbit
from lowbit.bench import cuda_graphed

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]


@triton.jit
def _read_kernel(p, out, n_words, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n_words, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(acc, 0))


def read_fn(words: torch.Tensor, block: int, pps: int, warps: int, stages: int):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = words.numel()
    grid = (min(triton.cdiv(n, block), sms * pps),)
    out = torch.empty(grid[0], dtype=torch.int32, device=words.device)
    return lambda: _read_kernel[grid](words, out, n, BLOCK=block, num_warps=warps, num_stages=stages)


def flushed_us(fn, dirty: bool, reps: int = 100) -> float:
    cache = torch.empty(2**26, dtype=torch.float32, device="cuda")  # 256 MB, as do_bench
    sink = torch.empty((), dtype=torch.float32, device="cuda")
    cache.fill_(1.0)
    for _ in range(10):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        if dirty:
            cache.zero_()
        else:
            torch.sum(cache, dim=0, out=sink)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for n, k in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        qw = lowbit.W4A8Config(group_size=None).quantize_weight(w)
        wp, sz, _ = tinygemm_weight(w)
        # the bytes the W4A8 per-row kernel reads: packed weight + one scale per row
        blob = torch.cat([qw.qdata.reshape(-1).view(torch.uint8), qw.scale.reshape(-1).view(torch.uint8)])
        blob = torch.cat([blob, blob.new_zeros((-blob.numel()) % 4)]).view(torch.int32)
        impls = {"w4a8_row": lambda: F.linear(x, qw),
                 "tinygemm_g128": lambda: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz),
                 "bf16": lambda: F.linear(x, w)}
        row: dict = {"N": n, "K": k, "w4a8_bytes": blob.numel() * 4}
        for name in list(impls):  # the same calls as CUDA-graph replays (no host time)
            impls[name + "_graphed"] = cuda_graphed(impls[name])
        for name, fn in impls.items():
            row[name] = {"do_bench": triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median") * 1e3,
                         "dirty": flushed_us(fn, True), "clean": flushed_us(fn, False)}
        best: dict = {}
        for block in (1024, 4096, 8192):
            for pps in (2, 4, 8, 16):
                for warps in (4, 8):
                    for stages in (1, 3):
                        fn = read_fn(blob, block, pps, warps, stages)
                        cfg = f"B{block}/pps{pps}/w{warps}/s{stages}"
                        for how, t in (("dirty", flushed_us(fn, True)), ("clean", flushed_us(fn, False))):
                            if how not in best or t < best[how][0]:
                                best[how] = (t, cfg, (block, pps, warps, stages))
        fn = read_fn(blob, *best["dirty"][2])
        row["read_floor"] = {"do_bench": triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median") * 1e3,
                             "dirty": best["dirty"][0], "clean": best["clean"][0],
                             "cfg_dirty": best["dirty"][1], "cfg_clean": best["clean"][1]}
        row["tinygemm_over_1.6"] = row["tinygemm_g128"]["do_bench"] / 1.6
        row["bf16_over_3"] = row["bf16"]["do_bench"] / 3
        rows.append(row)
    print(f"{'shape':12s} {'timing':9s} {'w4a8_row':>9s} {'tinygemm':>9s} {'bf16':>9s} {'w4a8 gr':>9s} "
          f"{'tg gr':>9s} {'bf16 gr':>9s} {'read':>9s}  target=min(tg/1.6, bf16/3)")
    for r in rows:
        for how in ("do_bench", "dirty", "clean"):
            tgt = min(r["tinygemm_over_1.6"], r["bf16_over_3"]) if how == "do_bench" else float("nan")
            print(f"{r['N']}x{r['K']:<6d} {how:9s} {r['w4a8_row'][how]:9.2f} {r['tinygemm_g128'][how]:9.2f} "
                  f"{r['bf16'][how]:9.2f} {r['w4a8_row_graphed'][how]:9.2f} {r['tinygemm_g128_graphed'][how]:9.2f} "
                  f"{r['bf16_graphed'][how]:9.2f} {r['read_floor'][how]:9.2f}  {tgt:6.2f}")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": os.environ.get("LOWBIT_GIT_SHA", "unknown"), "unit": "us", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
