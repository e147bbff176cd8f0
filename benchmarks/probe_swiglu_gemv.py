"""Probe: the feed-forward half of an eager decode step at one token, with SwiGLU in the [gate; up]
GEMV's epilogue (fastpath.add_norm_mlp) against the chain it replaces (add_norm_linear, then
swiglu_linear), on W4A8 weights with kernel=TRITON.

Per model (Llama-2-7B: dim 4096, F 11008; Llama-3-8B: dim 4096, F 14336), per-row and g128 weights,
CUDA-graph replays with L2 flushed (bench_linear's timing):
  chain_before   add_rms_norm -> stream GEMV (2F outputs) -> SwiGLU(-with-quantization) -> w2
  chain_now      add_rms_norm -> stream GEMV with SwiGLU -> act_quant_from_amax (per-row w2) -> w2
  parts          the gate/up GEMV alone with and without SwiGLU, the one-program SwiGLU+quant, the
                 quantization from absmaxes
Outputs of the two chains are compared bit for bit.

    python benchmarks/probe_swiglu_gemv.py [--out results/probe_swiglu_gemv_h100.json]
"""

from __future__ import annotations

import argparse

import torch
from bench_linear import GRAPHED_TIMING, timeit_graphed, write_probe_json

import lowbit
from lowbit.core.kernel_choice import KernelChoice
from lowbit.kernels import fused
from lowbit.kernels.w4a8.act_quant import act_quant_from_amax
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a, w4a8_gemv_swiglu
from lowbit.llm import fastpath
from lowbit.llm.model import RMSNorm

MODELS = [("llama-2-7b", 4096, 11008), ("llama-3-8b", 4096, 14336)]


def _linear(n: int, k: int, group_size: int | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    cfg = lowbit.W4A8Config(group_size=group_size, kernel=KernelChoice.TRITON)
    lin.weight = torch.nn.Parameter(cfg.quantize_weight(w), requires_grad=False)
    return lin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    args = ap.parse_args()
    rows = []
    bf = torch.bfloat16
    torch.set_grad_enabled(False)
    for name, dim, f in MODELS:
        for gs in (None, 128):
            norm = RMSNorm(dim, 1e-5).to("cuda", bf)
            w13, w2 = _linear(2 * f, dim, gs), _linear(dim, f, gs)
            qw = w13.weight
            for m in args.tokens:
                x = torch.randn(1, m, dim, device="cuda", dtype=bf)
                d = torch.randn(1, m, dim, device="cuda", dtype=bf)
                y = fused.add_rms_norm(x, d, norm.weight, 1e-5)[1].reshape(m, dim)

                def before():
                    _, gu = fastpath.add_norm_linear(norm, w13, x, d)
                    return fastpath.swiglu_linear(w2, gu)

                def now():
                    return fastpath.add_norm_mlp(norm, w13, w2, x, d)[1]

                h, amax = w4a8_gemv_swiglu(y, qw.qdata, qw.scale, None, qw.group_size)
                gu2 = w4a8_gemv_dp4a(y, qw.qdata, qw.scale, None, qw.group_size, kernel="stream")
                t = {"chain_before": timeit_graphed(before), "chain_now": timeit_graphed(now),
                     "gate_up_stream": timeit_graphed(
                         lambda: w4a8_gemv_dp4a(y, qw.qdata, qw.scale, None, qw.group_size, kernel="stream")),
                     "gate_up_stream_swiglu": timeit_graphed(
                         lambda: w4a8_gemv_swiglu(y, qw.qdata, qw.scale, None, qw.group_size)),
                     "swiglu_quant": timeit_graphed(lambda: fused.swiglu_quant(gu2)),
                     "quant_from_amax": timeit_graphed(lambda: act_quant_from_amax(h, amax))}
                equal = bool(torch.equal(before(), now()))
                rows.append({"model": name, "dim": dim, "F": f, "group_size": gs, "M": m, "us": t,
                             "outputs_equal": equal,
                             "takes_swiglu_gemv": bool(qw.streams_paired(x))})
                print(f"{name} g={gs or 'row'} M={m} " + " ".join(f"{a}={b:.1f}" for a, b in t.items())
                      + f" equal={equal}", flush=True)
    print("\n| model | scales | M | chain before | chain now | gate/up stream | + SwiGLU epilogue |"
          " SwiGLU+quant (1 program) | quant from absmax | equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["us"]
        print(f"| {r['model']} | {r['group_size'] or 'row'} | {r['M']} | {t['chain_before']:.1f} | "
              f"{t['chain_now']:.1f} | {t['gate_up_stream']:.1f} | {t['gate_up_stream_swiglu']:.1f} | "
              f"{t['swiglu_quant']:.1f} | {t['quant_from_amax']:.1f} | {r['outputs_equal']} |")
    if args.out:
        write_probe_json(args.out, rows, GRAPHED_TIMING)


if __name__ == "__main__":
    main()
