"""Probe: the feed-forward of one decode token as one cooperative launch with grid barriers.

kernels/w4a8/mlp_stream.py runs the [gate; up] stream GEMV with its SwiGLU epilogue, a grid
barrier, a per-program slice of act_quant_from_amax, a second barrier and the down projection
(gemv_q row blocks) in one persistent launch, against the three launches it replaces. This probe
times, in one run on Llama-2-7B shapes (8 layers' weights back to back in a CUDA graph, per layer):
  - the chain (w4a8_gemv_swiglu, act_quant_from_amax, w4a8_gemv_q) and the SwiGLU GEMV alone;
  - the fused launch stopped after phase 1 + barrier (STOP=1), after phase 2 + barrier (STOP=2),
    and whole, for several down-projection tilings (BLOCK_N2, BLOCK_W2);
  - a kernel of nothing but B grid barriers (B = 1, 17) for 132-528 programs: cost per barrier,
    with the arrival atomic acq_rel (as grid_barrier) and relaxed.

    python benchmarks/probe_grid_barrier.py [--out results/probe_grid_barrier_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

import lowbit
from lowbit.bench import cuda_graphed
from lowbit.kernels.grid import _load_acquire, grid_barrier, sync_buffer
from lowbit.kernels.w4a8.act_quant import act_quant_from_amax
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_swiglu
from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_q
from lowbit.kernels.w4a8.mlp_stream import w4a8_mlp


@triton.jit
def _barriers(sync_ptr, B: tl.constexpr, RELAXED: tl.constexpr):
    for _ in range(B):
        if RELAXED:
            tl.debug_barrier()
            gen = _load_acquire(sync_ptr + 1)
            arrived = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
            if arrived == tl.num_programs(0) - 1:
                tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
                tl.atomic_add(sync_ptr + 1, 1, sem="relaxed", scope="gpu")
            else:
                while _load_acquire(sync_ptr + 1) == gen:
                    pass
            tl.debug_barrier()
        else:
            grid_barrier(sync_ptr)


def graph_us(fn, per: int = 1) -> float:
    g = cuda_graphed(fn)
    return min(triton.testing.do_bench(g, warmup=10, rep=60, return_mode="median") for _ in range(2)) * 1e3 / per


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "git_sha": os.environ.get("LOWBIT_GIT_SHA", "unknown"), "unit": "us", "barrier": [], "mlp": []}
    sync = sync_buffer(torch.device("cuda"))
    for relaxed in (False, True):
        for progs, warps in ((132, 4), (264, 4), (528, 4), (264, 8)):
            t = [graph_us(lambda b=b: _barriers[(progs,)](sync, B=b, RELAXED=relaxed, num_warps=warps,
                                                           launch_cooperative_grid=True)) for b in (1, 17)]
            row = {"arrival": "relaxed" if relaxed else "acq_rel", "programs": progs, "warps": warps,
                   "kernel_1_barrier": t[0], "per_barrier": (t[1] - t[0]) / 16}
            res["barrier"].append(row)
            print(row, flush=True)
    torch.manual_seed(0)
    k, f, n2, layers = 4096, 11008, 4096, 8
    cfg = lowbit.W4A8Config(group_size=None)
    ws = [(cfg.quantize_weight((torch.randn(2 * f, k, device="cuda") * 0.02).to(torch.bfloat16)),
           cfg.quantize_weight((torch.randn(n2, f, device="cuda") * 0.02).to(torch.bfloat16))) for _ in range(layers)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

    def swiglu_only():
        for w13, _ in ws:
            w4a8_gemv_swiglu(x, w13.qdata, w13.scale, None, w13.group_size)

    def chain():
        for w13, w2 in ws:
            h, amax = w4a8_gemv_swiglu(x, w13.qdata, w13.scale, None, w13.group_size)
            q, s = act_quant_from_amax(h, amax)
            y = w4a8_gemv_q(q, s, w2.qdata, w2.scale, None, w2.group_size, x.dtype)
        return y

    def fused():
        for w13, w2 in ws:
            y = w4a8_mlp(x, w13.qdata, w13.scale, None, w13.group_size, w2.qdata, w2.scale, None, w2.group_size)
        return y

    ref = chain()
    res["mlp"].append({"variant": "swiglu_gemv_alone", "us": graph_us(swiglu_only, layers)})
    res["mlp"].append({"variant": "chain", "us": graph_us(chain, layers)})
    for stop in ("1", "2"):
        os.environ["MLP_STOP"] = stop
        res["mlp"].append({"variant": f"fused_stop{stop}", "us": graph_us(fused, layers)})
    os.environ["MLP_STOP"] = "9"
    for q in ("4,256", "8,128", "8,256", "16,128", "2,512", "4,512", "8,512"):
        os.environ["MLP_Q"] = q
        y = fused()
        res["mlp"].append({"variant": f"fused_down{q.replace(',', 'x')}", "us": graph_us(fused, layers),
                           "equal_to_chain": torch.equal(y, ref)})
    for r in res["mlp"]:
        print(r)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
