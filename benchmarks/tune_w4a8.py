"""Sweep launch configs of the W4A8 kernels on the GPU; prints the best per shape and writes JSON.

Usage: python benchmarks/tune_w4a8.py [--sections gemv,decode,prefill] --out FILE.json
Small-M kernels are timed as CUDA-graph replays (do_bench still flushes L2 between
replays), so host launch overhead does not hide kernel time.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from lowbit.bench import cuda_graphed
from lowbit.core.packing import pack_int4
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.decode import w4_decode
from lowbit.kernels.w4a8.expand import unpack_int4_triton
from lowbit.kernels.w4a8.gemv import w4_gemv
from lowbit.kernels.w4a8.prefill import int8_gemm
from lowbit.kernels.w4a8.swapped import w4a8_gemm_swapped

SHAPES = [(4096, 4096), (22016, 4096), (4096, 11008), (12288, 4096), (1024, 4096)]


def t_us(fn, graph: bool = False) -> float:
    f = cuda_graphed(fn) if graph else fn
    return triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median") * 1e3


def sweep(label, rows, candidates, run, graph, extra=""):
    best = None
    for cfg in candidates:
        try:
            us = t_us(lambda: run(cfg), graph=graph)
        except Exception as e:
            print(f"  {label} fail {cfg}: {type(e).__name__}: {str(e)[:160]}")
            continue
        rows.append({"label": label, "cfg": cfg, "us": us})
        if best is None or us < best[0]:
            best = (us, cfg)
    if best:
        print(f"{label}: {best[0]:.1f} us {extra.format(us=best[0])} {best[1]}", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tune_w4a8.json")
    ap.add_argument("--sections", default="gemv,decode,prefill")
    ap.add_argument("--rule-only", action="store_true", help="decode16: time the launch rule, no sweep")
    ap.add_argument("--groups", default="both", choices=["both", "row", "g128"])
    ap.add_argument("--shapes", default=None, help="NxK comma list (default: the built-in five)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    res: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": []}
    rows = res["rows"]
    shapes = [tuple(map(int, x.split("x"))) for x in args.shapes.split(",")] if args.shapes else SHAPES
    for n, k in shapes:
        q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
        packed = pack_int4(q)
        w16 = q.to(torch.bfloat16)
        for group in (128, None) if args.groups == "both" else ((None,) if args.groups == "row" else (128,)):
            g = group or k
            scale = (torch.rand(n, k // g, device="cuda") * 0.01).to(torch.bfloat16)
            wb = n * k / 2 + scale.numel() * 2
            if "gemv" in sections:
                for m in (1, 4):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    cands = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1)
                             for bn, bk, w in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))
                             if bn * bk <= 16384]
                    for quant in (True, False):
                        best = sweep(f"gemv {n}x{k} M={m} g={group} quant_a={quant}", rows, cands,
                                     lambda c: w4_gemv(x, packed, scale, None, None, g, quant, config=c), True)
                        if best:
                            print(f"   -> {wb / best[0] / 1e3:.0f} GB/s weight read")
            if "dp4a" in sections:
                from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a

                x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                cands = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1)
                         for bn, bk, w in itertools.product((8, 16, 32, 64, 128), (256, 512, 1024), (4, 8))
                         if bn * bk <= 65536]
                best = sweep(f"dp4a {n}x{k} M=1 g={group}", rows, cands,
                             lambda c: w4a8_gemv_dp4a(x, packed, scale, None, g, config=c), True)
                if best:
                    print(f"   -> {wb / best[0] / 1e3:.0f} GB/s weight read; autotuned "
                          f"{t_us(lambda: w4a8_gemv_dp4a(x, packed, scale, None, g), graph=True):.1f} us; "
                          f"bf16 {t_us(lambda: x @ w16.t(), graph=True):.1f} us", flush=True)
            if "stream" in sections:
                import sys

                from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a
                from lowbit.kernels.w4a8.gemv_stream import STREAM_SET, stream_config

                sys.path.insert(0, str(Path(__file__).resolve().parent))
                import bench_linear as bl  # ceilings() and torch's tinygemm weight layout

                copy = res.setdefault("copy_gbps", bl.ceilings()["copy_gbps"])
                if "floor_us" not in res:  # one tiny kernel, timed the same way: the fixed cost
                    tiny = torch.zeros(1, device="cuda")
                    res["floor_us"] = t_us(lambda: tiny.add_(1), graph=True)
                    print(f"floor (one 1-element kernel, graph-timed): {res['floor_us']:.1f} us")
                for m in (1, 4) if (n, k) == (4096, 4096) else (1,):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    label = f"stream {n}x{k} M={m} g={group}"
                    cands = [dict(BLOCK_N=bn, PPS=pps, DEPTH=d, num_warps=nw) for bn, pps, d, nw in STREAM_SET]
                    best = sweep(label, rows, cands,
                                 lambda c: w4a8_gemv_dp4a(x, packed, scale, None, g, config=c, kernel="stream"),
                                 True)
                    rule = t_us(lambda: w4a8_gemv_dp4a(x, packed, scale, None, g, kernel="stream"), graph=True)
                    wp, sz, _ = bl.tinygemm_weight(w16)
                    t = {"blocked": t_us(lambda: w4a8_gemv_dp4a(x, packed, scale, None, g, kernel="blocked"),
                                         graph=True),
                         "bf16": t_us(lambda: x @ w16.t(), graph=True),
                         "tinygemm_g128": t_us(lambda: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz),
                                               graph=True)}
                    if best:
                        t.update(stream=best[0], stream_cfg=best[1], rule_us=rule, rule_cfg=stream_config(m, n, k), gbps=wb / best[0] / 1e3,
                                 pct_copy=100 * wb / best[0] / 1e3 / copy,
                                 x_bf16=t["bf16"] / best[0], x_tinygemm=t["tinygemm_g128"] / best[0])
                    rows.append({"label": f"summary {label}", **t})
                    print(f"   -> {t}", flush=True)
            if "swapdec" in sections:
                for m in (16, 64):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    qp, sp_ = act_quant(x, permute=True)
                    cands = [dict(BLOCK_N=bn, BLOCK_M=16 if m == 16 else 64, GROUP_N=8, num_warps=4, num_stages=s)
                             for bn, s in itertools.product((64, 128), (3, 4, 6))]
                    sweep(f"swapped-decode {n}x{k} M={m} g={group}", rows, cands,
                          lambda c: w4a8_gemm_swapped(qp, sp_, packed, scale, None, g, torch.bfloat16, config=c),
                          True)
                    print(f"   act_quant(permute) M={m}: {t_us(lambda: act_quant(x, True), graph=True):.1f} us; "
                          f"bf16 {t_us(lambda: x @ w16.t(), graph=True):.1f} us")
            if "actq" in sections:
                for m in (2048, 8192):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    print(f"act_quant {m}x{k}: {t_us(lambda: act_quant(x)):.1f} us "
                          f"({m * k * 3 / t_us(lambda: act_quant(x)) / 1e3:.0f} GB/s)")
            if "decode" in sections:
                for m in (16,):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    qa, sa = act_quant(x)
                    cands = [dict(BLOCK_M=16 if m == 16 else bm, BLOCK_N=bn, BLOCK_K=bk, SUB_K=group or 128,
                                  SPLIT_K=sp, num_warps=4, num_stages=st)
                             for bm, bn, bk, sp, st in itertools.product((16,), (32, 64, 128), (256, 512), (1,), (3, 4))
                             if bk >= (group or 128) and not (m == 16 and bm == 64)]
                    best = sweep(f"decode-dot {n}x{k} M={m} g={group}", rows, cands,
                                 lambda c: w4_decode(qa, sa, packed, scale, None, None, g, torch.bfloat16,
                                                     config=c), True)
                    us_q = t_us(lambda: act_quant(x), graph=True)
                    print(f"   act_quant M={m}: {us_q:.1f} us")
            if "decode16" in sections:  # the whole M=16 path: act quant + decode kernel (+ split-K sum)
                x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
                cands = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SUB_K=group or 128, SPLIT_K=sp, num_warps=w,
                              num_stages=st)
                         for bn, bk, sp, st, w in itertools.product((16, 32, 64), (256, 512, 1024), (1, 2, 4, 8),
                                                                    (2, 3, 4), (4,))
                         if bk >= (group or 128) and k // sp >= bk]

                def path(c):
                    qa, sa = act_quant(x)
                    return w4_decode(qa, sa, packed, scale, None, None, g, torch.bfloat16, config=c)

                best = None if args.rule_only else sweep(f"decode16 {n}x{k} g={group}", rows, cands, path, True)
                rule = t_us(lambda: path(None), graph=True)
                bf16 = t_us(lambda: x @ w16.t(), graph=True)
                rows.append({"label": f"summary decode16 {n}x{k} g={group}", "rule_us": rule, "bf16_us": bf16,
                             "best_us": best[0] if best else None, "best_cfg": best[1] if best else None})
                print(f"   rule {rule:.1f} us, bf16 {bf16:.1f} us", flush=True)
            if "decode16q" in sections:  # M=16 from prequantized activations (compiled graphs fuse the quant)
                x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
                qa, sa = act_quant(x)
                cands = [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SUB_K=group or 128, SPLIT_K=sp, num_warps=w,
                              num_stages=st)
                         for bn, bk, sp, st, w in itertools.product((16, 32, 64), (256, 512), (1, 2, 4),
                                                                    (3, 4), (4, 8))
                         if bk >= (group or 128) and k // sp >= bk]
                best = None if args.rule_only else sweep(
                    f"decode16q {n}x{k} g={group}", rows, cands,
                    lambda c: w4_decode(qa, sa, packed, scale, None, None, g, torch.bfloat16, config=c), True)
                rule = t_us(lambda: w4_decode(qa, sa, packed, scale, None, None, g, torch.bfloat16), graph=True)
                cutlass_us = None
                if group is None:
                    from lowbit.kernels.cutlass import build
                    from lowbit.kernels.cutlass import w4a8 as cutlass_w4a8

                    if build.compiled():
                        cutlass_us = t_us(lambda: cutlass_w4a8.gemm(qa, sa, packed, scale, None, torch.bfloat16),
                                          graph=True)
                bf16 = t_us(lambda: x @ w16.t(), graph=True)
                rows.append({"label": f"summary decode16q {n}x{k} g={group}", "rule_us": rule, "bf16_us": bf16,
                             "cutlass_us": cutlass_us, "best_us": best[0] if best else None,
                             "best_cfg": best[1] if best else None})
                print(f"   rule {rule:.1f} us, cutlass {cutlass_us} us, bf16 {bf16:.1f} us", flush=True)
            if "prefill" in sections:
                for m in (128, 2048, 8192):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    qp, sp_ = act_quant(x, permute=True)
                    cands = [dict(BLOCK_N=bn, BLOCK_M=bm, GROUP_N=gn, num_warps=w, num_stages=s)
                             for bn, bm, gn, w, s in [(128, 128, 8, 8, 4), (128, 256, 8, 8, 3), (256, 128, 8, 8, 3),
                                                      (128, 128, 8, 4, 4), (64, 128, 8, 4, 4), (128, 64, 8, 4, 4),
                                                      (128, 128, 8, 8, 3), (64, 64, 8, 4, 4)]]
                    best_sw = sweep(f"swapped {n}x{k} M={m} g={group}", rows, cands,
                                    lambda c: w4a8_gemm_swapped(qp, sp_, packed, scale, None, g, torch.bfloat16,
                                                                config=c), False)
                    qa, sa = act_quant(x)
                    w8 = unpack_int4_triton(packed)
                    cands = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=group or bk, GROUP_M=8, num_warps=w, num_stages=s)
                             for bm, bn, bk, w, s in [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                                      (128, 128, 128, 8, 4), (64, 128, 128, 4, 4)]]
                    best_ex = sweep(f"int8gemm {n}x{k} M={m} g={group}", rows, cands,
                                    lambda c: int8_gemm(qa, sa, w8, scale, None, g, torch.bfloat16, config=c),
                                    False)
                    t = {"act_quant": t_us(lambda: act_quant(x)), "act_quant_perm": t_us(lambda: act_quant(x, True)),
                         "unpack": t_us(lambda: unpack_int4_triton(packed)),
                         "int_mm": t_us(lambda: torch._int_mm(qa, w8.t())) if m > 16 else None,
                         "bf16": t_us(lambda: torch.nn.functional.linear(x, w8.to(torch.bfloat16)))}
                    rows.append({"label": f"parts {n}x{k} M={m} g={group}", **t})
                    print(f"   parts: {t} | swapped total {best_sw[0] + t['act_quant_perm']:.1f} "
                          f"expanded total {best_ex[0] + t['act_quant'] + t['unpack']:.1f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
