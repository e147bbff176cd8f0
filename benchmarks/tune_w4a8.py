"""Sweep launch configs of the W4A8 kernels on the GPU; prints the best per shape and writes JSON.

Usage: python benchmarks/tune_w4a8.py --out FILE.json
GPU times: small-M kernels are timed as CUDA-graph replays (L2 flushed by do_bench), so
launch overhead on the host does not hide the kernel time.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from lowbit.core.packing import pack_int4
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.decode import w4_decode
from lowbit.kernels.w4a8.prefill import int8_gemm, unpack_int4_triton

SHAPES = [(4096, 4096), (22016, 4096), (4096, 11008), (1024, 4096)]


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return lambda: g.replay()


def t_us(fn, graph: bool = False) -> float:
    f = graphed(fn) if graph else fn
    return triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tune_w4a8.json")
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": []}
    rows = res["rows"]
    for n, k in SHAPES:
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
        packed = pack_int4(q)
        for group in (128, None):
            g = group or k
            scale = (torch.rand(n, k // g, device="cuda") * 0.01).to(torch.bfloat16)
            # -- decode sweep -------------------------------------------------------------
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                qa, sa = act_quant(x)
                best = None
                for bn, bk, split, stages, warps in itertools.product((16, 32, 64), (256, 512), (1, 2, 4),
                                                                       (3, 5), (4,)):
                    sub = group or 128
                    if bk < sub:
                        continue
                    cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SUB_K=sub, SPLIT_K=split,
                               num_warps=warps, num_stages=stages)
                    try:
                        us = t_us(lambda: w4_decode(qa, sa, packed, scale, None, None, g, torch.bfloat16,
                                                    config=cfg), graph=True)
                    except Exception as e:
                        print("decode fail", cfg, type(e).__name__, str(e)[:200])
                        continue
                    rows.append({"kind": "decode_a8", "N": n, "K": k, "M": m, "group": group, "cfg": cfg,
                                 "us": us})
                    if best is None or us < best[0]:
                        best = (us, cfg)
                gbps = (n * k / 2 + scale.numel() * 2) / best[0] / 1e3
                print(f"decode a8 {n}x{k} M={m} g={group}: {best[0]:.1f} us {gbps:.0f} GB/s {best[1]}",
                      flush=True)
                bf = w4_decode(x, None, packed, scale, None, None, g, torch.bfloat16, config=best[1])
                us_bf = t_us(lambda: w4_decode(x, None, packed, scale, None, None, g, torch.bfloat16,
                                               config=best[1]), graph=True)
                us_q = t_us(lambda: act_quant(x), graph=True)
                print(f"   same cfg, bf16 activations: {us_bf:.1f} us; act_quant alone {us_q:.1f} us", flush=True)
                del bf
            # -- prefill sweep ------------------------------------------------------------
            for m in (2048, 8192):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                qa, sa = act_quant(x)
                best = None
                for bm, bn, bk, warps, stages, gm in [
                    (128, 256, 128, 8, 3, 8), (256, 128, 128, 8, 3, 8), (128, 128, 128, 4, 4, 8),
                    (128, 128, 128, 8, 4, 8), (128, 256, 64, 8, 4, 8), (128, 128, 256, 8, 3, 8),
                    (128, 256, 128, 8, 4, 8), (64, 256, 128, 4, 4, 8), (128, 128, 64, 4, 5, 8),
                    (256, 128, 64, 8, 4, 8),
                ]:
                    if group and bk != group:
                        bk = group
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
                    try:
                        us = t_us(lambda: int8_gemm(qa, sa, q, scale, None, g, torch.bfloat16, config=cfg))
                    except Exception as e:
                        print("gemm fail", cfg, type(e).__name__, str(e)[:200])
                        continue
                    rows.append({"kind": "gemm", "N": n, "K": k, "M": m, "group": group, "cfg": cfg, "us": us})
                    if best is None or us < best[0]:
                        best = (us, cfg)
                us_int_mm = t_us(lambda: torch._int_mm(qa, q.t()))
                xb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                us_bf16 = t_us(lambda: x @ xb.t())
                us_q = t_us(lambda: act_quant(x))
                us_unpack = t_us(lambda: unpack_int4_triton(packed))
                print(f"gemm {n}x{k} M={m} g={group}: best {best[0]:.1f} us {best[1]} | _int_mm {us_int_mm:.1f} "
                      f"bf16 {us_bf16:.1f} act_quant {us_q:.1f} unpack {us_unpack:.1f}", flush=True)
                rows.append({"kind": "parts", "N": n, "K": k, "M": m, "group": group, "int_mm": us_int_mm,
                             "bf16": us_bf16, "act_quant": us_q, "unpack": us_unpack, "best_gemm": best[0]})
                del xb
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
