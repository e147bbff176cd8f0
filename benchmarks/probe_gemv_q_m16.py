"""Probe: the dp4a GEMV from pre-quantized activations (gemv_q) at 8-16 tokens.

gemv_q is routed at M <= 4. At M=16 lowbit runs the int8 tensor-core decode kernel or CUTLASS,
which read the weight at ~0.5-1 TB/s (4096x11008: ~39-41 us for 22.5 MB). gemv_q streams the
weight once whatever M is; its dp4a work grows with M. This sweeps gemv_q's launch config at
M in {8, 16} on Llama-2-7B shapes, per row, and times act_quant + gemv_q (what a linear would run)
next to today's F.linear (AUTO) and bf16 cuBLAS, all as CUDA-graph replays with L2 flushed
(do_bench), in one run. Checks gemv_q against the reference on each shape first. Usage (GPU):

    python benchmarks/probe_gemv_q_m16.py [--out results/probe_gemv_q_m16_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

import lowbit
from lowbit.bench import time_cuda_graphed
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.gemv_q import _w4a8_gemv_q_kernel
from lowbit.kernels.w4a8.reference import act_quant_ref

SHAPES = [(4096, 4096), (4096, 11008), (12288, 4096), (22016, 4096)]
CONFIGS = [dict(BLOCK_N=bn, BLOCK_W=bw, num_warps=nw, num_stages=ns)
           for bn in (4, 8, 16) for bw in (32, 64, 128) for nw in (4, 8) for ns in (1, 3)]


def gemv_q_any_m(qa, sa, words, scale, out, cfg):
    m, k = qa.shape
    n = words.shape[0]
    qw = qa.view(torch.int32)
    kw = k // 8
    _w4a8_gemv_q_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        qw, sa, words, scale, scale, out, m, n, kw, kw // 4, qw.stride(0), words.stride(0), scale.stride(0),
        out.stride(0), GROUP=0, HAS_BIAS=False, USE_ASM=True, BLOCK_M=triton.next_power_of_2(m), **cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for n, k in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        qw = lowbit.W4A8Config(group_size=None).quantize_weight(w)
        words = qw.qdata.view(torch.int32)
        scale = qw.scale
        for m in (8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            qa, sa = act_quant(x)
            sa = sa.reshape(m).contiguous()
            # correctness: exact integer dots, then scales (fp32) -> bf16
            qr, sr = act_quant_ref(x.float())
            ref = ((qr.float() @ (qw.int_data().float().t())) * sr.reshape(m, 1) * scale.float().reshape(1, n))
            got = gemv_q_any_m(qa, sa, words, scale, out, CONFIGS[0]).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            best = (float("inf"), None)
            for cfg in CONFIGS:
                try:
                    us = time_cuda_graphed(lambda: gemv_q_any_m(qa, sa, words, scale, out, cfg))
                except Exception as e:  # out of resources for a config: skip it
                    print(f"{n}x{k} M={m} {cfg}: {type(e).__name__}")
                    continue
                if us < best[0]:
                    best = (us, cfg)

            def with_quant():
                q2, s2 = act_quant(x)
                gemv_q_any_m(q2, s2.reshape(m), words, scale, out, best[1])

            got = gemv_q_any_m(qa, sa, words, scale, out, best[1]).float()
            err = max(err, ((got - ref).abs().max() / ref.abs().max()).item())  # the winner too
            row = {"N": n, "K": k, "M": m, "gemv_q_best_us": best[0], "gemv_q_best_cfg": best[1],
                   "act_quant_plus_gemv_q_us": time_cuda_graphed(with_quant),
                   "act_quant_us": time_cuda_graphed(lambda: act_quant(x)),
                   "lowbit_auto_us": time_cuda_graphed(lambda: F.linear(x, qw)),
                   "bf16_us": time_cuda_graphed(lambda: F.linear(x, w)), "max_rel_err": err}
            rows.append(row)
            print(f"{n}x{k} M={m}: gemv_q {best[0]:.1f} us {best[1]} | +act_quant {row['act_quant_plus_gemv_q_us']:.1f}"
                  f" | act_quant {row['act_quant_us']:.1f} | AUTO {row['lowbit_auto_us']:.1f} | bf16 {row['bf16_us']:.1f}"
                  f" | rel err {err:.1e}", flush=True)
    print(f"{'shape':12s} {'M':>3s} {'q+gemv_q':>9s} {'AUTO':>8s} {'bf16':>8s} {'x bf16':>7s} {'AUTO x bf16':>11s}")
    for r in rows:
        print(f"{r['N']}x{r['K']:<6d} {r['M']:3d} {r['act_quant_plus_gemv_q_us']:9.1f} {r['lowbit_auto_us']:8.1f} "
              f"{r['bf16_us']:8.1f} {r['bf16_us'] / r['act_quant_plus_gemv_q_us']:7.2f} "
              f"{r['bf16_us'] / r['lowbit_auto_us']:11.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "git_sha": os.environ.get("LOWBIT_GIT_SHA", "unknown"), "timing": "cuda-graph do_bench median",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
