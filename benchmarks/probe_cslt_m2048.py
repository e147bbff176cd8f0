"""Probe: cuSPARSELt 2:4 bf16 at M=1024-8192 (is the M=2048 slowdown in lowbit's call or in the
library?). Times dense cuBLAS, torch's own to_sparse_semi_structured linear, and _cslt_sparse_mm
with each algorithm id / operand layout as CUDA-graph replays, L2 flushed (median), and lists the
kernels one eager call launches. --fp8: e4m3 2:4 against dense rowwise _scaled_mm instead.
(results/probe_cslt_m2048_eager_h100.json is this probe's first version, 9e30cba, timed eagerly.)

Usage: python benchmarks/probe_cslt_m2048.py [--fp8] --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from lowbit.bench import time_cuda_graphed
from lowbit.sparsity import prune_24


def kernels(fn):
    """(name, us) of the GPU kernels one eager call launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.key[:90], round(e.device_time_total, 1)) for e in prof.key_averages() if e.device_time_total > 0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--fp8", action="store_true", help="float8 e4m3 2:4 vs dense rowwise _scaled_mm instead")
    args = ap.parse_args()
    if args.fp8:
        return fp8(args)
    dev, dt = "cuda", torch.bfloat16
    rows = []
    for n, k in ((11008, 4096), (4096, 11008)):
        w = prune_24(torch.randn(n, k, device=dev, dtype=dt))
        comp = torch._cslt_compress(w)
        ts = torch.sparse.to_sparse_semi_structured(w)
        for m in (1024, 2048, 4096, 8192):
            x = torch.randn(m, k, device=dev, dtype=dt)
            r = dict(N=n, K=k, M=m)
            r["dense_us"] = time_cuda_graphed(lambda: torch.nn.functional.linear(x, w))
            try:
                r["torch_semi_structured_us"] = time_cuda_graphed(lambda: torch.nn.functional.linear(x, ts))
            except Exception as e:  # noqa: BLE001
                r["torch_semi_structured_err"] = repr(e)[:200]
            xt = x.t()
            xtc = x.t().contiguous()
            best = None
            for alg in range(0, 6):
                for name, b, tr in (("view_T", xt, True), ("copyT", xtc, False), ("view", xt, False)):
                    try:
                        us = time_cuda_graphed(lambda b=b, tr=tr, alg=alg: torch._cslt_sparse_mm(comp, b, alg_id=alg,
                                                                                 transpose_result=tr))
                    except Exception as e:  # noqa: BLE001
                        r[f"alg{alg}_{name}_err"] = repr(e)[:120]
                        continue
                    r[f"alg{alg}_{name}_us"] = round(us, 1)
                    if best is None or us < best[0]:
                        best = (us, alg, name)
            r["best"] = best
            if m == 2048:
                r["kernels_alg0_view_T"] = kernels(lambda: torch._cslt_sparse_mm(comp, xt, transpose_result=True))
                print(r["kernels_alg0_view_T"], flush=True)
            print(n, k, m, "dense", round(r["dense_us"], 1), "torch_ss", round(r.get("torch_semi_structured_us", -1), 1),
                  "best cslt", best, flush=True)
            rows.append(r)
    if args.out:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       cusparselt=torch.backends.cusparselt.version(),
                       git_sha=os.environ.get("LOWBIT_GIT_SHA"), rows=rows), open(args.out, "w"), indent=1)


def fp8(args):
    """float8 e4m3 x 2:4 e4m3 weights through cuSPARSELt (torch._cslt_compress / _cslt_sparse_mm,
    bf16 out) next to dense rowwise-scaled torch._scaled_mm, graph-replayed; outputs compared."""
    dev, f8 = "cuda", torch.float8_e4m3fn
    rows = []
    for n, k in ((11008, 4096), (4096, 11008)):
        w = prune_24(torch.randn(n, k, device=dev)).to(f8)
        r0 = dict(N=n, K=k)
        try:
            comp = torch._cslt_compress(w)
        except Exception as e:  # noqa: BLE001
            rows.append(r0 | dict(compress_err=repr(e)[:200]))
            print(n, k, "compress failed", repr(e)[:200], flush=True)
            continue
        for m in (16, 2048, 8192):
            x = (torch.randn(m, k, device=dev) * 0.5).to(f8)
            sa = torch.ones(m, 1, device=dev)
            sw = torch.ones(1, n, device=dev)
            r = dict(r0, M=m)
            want = torch._scaled_mm(x, w.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16)
            r["dense_scaled_mm_us"] = round(time_cuda_graphed(lambda: torch._scaled_mm(x, w.t(), scale_a=sa, scale_b=sw,
                                                                        out_dtype=torch.bfloat16)), 1)
            best = None
            for alg in range(0, 6):
                for name, tr in (("mn", True), ("nm", False)):
                    def run(alg=alg, tr=tr):
                        return torch._cslt_sparse_mm(comp, x.t(), out_dtype=torch.bfloat16, transpose_result=tr,
                                                     alg_id=alg)
                    try:
                        us = time_cuda_graphed(run)
                        got = run()
                        got = got if tr else got.t()
                        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                    except Exception as e:  # noqa: BLE001
                        r[f"alg{alg}_{name}_err"] = repr(e)[:160]
                        continue
                    r[f"alg{alg}_{name}_us"] = round(us, 1)
                    r[f"alg{alg}_{name}_rel_err"] = err
                    if best is None or us < best[0]:
                        best = (round(us, 1), alg, name)
            r["best"] = best
            r["speedup"] = round(r["dense_scaled_mm_us"] / best[0], 3) if best else None
            print(n, k, m, "dense fp8", r["dense_scaled_mm_us"], "2:4 fp8 best", best, "speedup", r["speedup"],
                  flush=True)
            rows.append(r)
    if args.out:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       cusparselt=torch.backends.cusparselt.version(), what="fp8 e4m3 2:4 vs dense",
                       git_sha=os.environ.get("LOWBIT_GIT_SHA"), rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
