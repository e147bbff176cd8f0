"""Probe: the residual add + RMSNorm in the streaming W4A8 GEMV's prologue (NORM), scale in the epilogue.

Decode at batch 1 runs add + RMSNorm as its own short launch before the [q; k; v] and the
[gate; up] GEMVs. With NORM the GEMV takes the residual stream and the update, adds them
(every program stores its share of the sum), quantizes h * norm_weight per token and applies the per-token
1 / rms(h) with the activation scale in its epilogue. This probe times, per layer, 8 Llama-2-7B
layers' weights back to back in a CUDA graph, M=1:
  - qkv:  add_rms_norm + w4a8_gemv_rope_cache   vs  w4a8_gemv_rope_cache(norm=...)
  - gate/up: add_rms_norm + w4a8_gemv_swiglu   vs  w4a8_gemv_swiglu(norm=...)
and checks the new residual equals add_rms_norm's bit for bit and the outputs' distance to the
chain's.

    python benchmarks/probe_stream_norm.py [--out results/probe_stream_norm_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

import lowbit
from lowbit.bench import cuda_graphed
from lowbit.kernels import fused
from lowbit.kernels.w4a8.gemv_dp4a import NormIn, w4a8_gemv_rope_cache, w4a8_gemv_swiglu


def graph_us(fn, per: int) -> float:
    g = cuda_graphed(fn)
    return min(triton.testing.do_bench(g, warmup=10, rep=60, return_mode="median") for _ in range(3)) * 1e3 / per


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--group-size", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    dim, f, nq, nk, hd, layers, seq = 4096, 11008, 32, 32, 128, 8, 160
    cfg = lowbit.W4A8Config(group_size=args.group_size or None)
    qkv = [cfg.quantize_weight((torch.randn((nq + 2 * nk) * hd, dim, device=dev) * 0.02).to(dt)) for _ in range(layers)]
    gu = [cfg.quantize_weight((torch.randn(2 * f, dim, device=dev) * 0.02).to(dt)) for _ in range(layers)]
    nws = [(torch.rand(dim, device=dev) + 0.5).to(dt) for _ in range(layers)]
    x = torch.randn(1, dim, device=dev, dtype=dt)
    d = torch.randn(1, dim, device=dev, dtype=dt)
    h_out = torch.empty_like(x)
    cos = torch.randn(1, hd, device=dev, dtype=dt)
    sin = torch.randn(1, hd, device=dev, dtype=dt)
    pos = torch.tensor([40], device=dev, dtype=torch.int32)
    kc = torch.zeros(1, nk, seq, hd, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    eps = 1e-5

    def qkv_chain():
        for w, nw in zip(qkv, nws):
            h, y = fused.add_rms_norm(x, d, nw, eps)
            q = w4a8_gemv_rope_cache(y, w.qdata, w.scale, None, w.group_size, cos, sin, pos, kc, vc, nq, nk, 1)
        return h, q

    def qkv_norm():
        for w, nw in zip(qkv, nws):
            q = w4a8_gemv_rope_cache(x, w.qdata, w.scale, None, w.group_size, cos, sin, pos, kc, vc, nq, nk, 1,
                                     norm=NormIn(nw, eps, d, h_out))
        return h_out, q

    def gu_chain():
        for w, nw in zip(gu, nws):
            h, y = fused.add_rms_norm(x, d, nw, eps)
            a, _ = w4a8_gemv_swiglu(y, w.qdata, w.scale, None, w.group_size)
        return h, a

    def gu_norm():
        for w, nw in zip(gu, nws):
            a, _ = w4a8_gemv_swiglu(x, w.qdata, w.scale, None, w.group_size, norm=NormIn(nw, eps, d, h_out))
        return h_out, a

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "git_sha": os.environ.get("LOWBIT_GIT_SHA", "unknown"), "unit": "us per layer", "M": 1,
                 "group_size": args.group_size, "rows": []}
    for name, chain, normed in (("qkv_rope", qkv_chain, qkv_norm), ("gate_up_swiglu", gu_chain, gu_norm)):
        hc, oc = (t.clone() for t in chain())
        hn, on = (t.clone() for t in normed())
        err = ((on.float() - oc.float()).abs().max() / oc.float().abs().max()).item()
        t_chain, t_norm = [], []
        for _ in range(2):  # interleaved
            t_chain.append(graph_us(chain, layers))
            t_norm.append(graph_us(normed, layers))
        row = {"layer": name, "chain_us": min(t_chain), "norm_us": min(t_norm), "chain_all": t_chain,
               "norm_all": t_norm, "h_equal": torch.equal(hc, hn), "max_rel_diff_vs_chain": err}
        res["rows"].append(row)
        print(f"{name:16s} chain {row['chain_us']:6.2f}  norm-in-prologue {row['norm_us']:6.2f}  "
              f"saving {row['chain_us'] - row['norm_us']:5.2f} us  h_equal={row['h_equal']}  rel diff {err:.2e}",
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
