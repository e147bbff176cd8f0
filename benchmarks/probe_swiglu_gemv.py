"""Probe: an eager decode step's streaming W4A8 GEMVs at one or two tokens with their neighbours
fused in (w4a8_gemv_stream_fused: residual add + RMSNorm in the prologue, SwiGLU in the epilogue),
against the separate kernels, on W4A8 weights with kernel=TRITON.

Per model (Llama-2-7B: dim 4096, F 11008; Llama-3-8B: dim 4096, F 14336), per-row and g128 weights,
CUDA-graph replays with L2 flushed (bench_linear's timing):
  mlp_before   add_rms_norm -> stream GEMV (2F outputs) -> SwiGLU(-with-quantization) -> w2
  mlp_swiglu   add_rms_norm -> stream GEMV with SwiGLU -> act_quant_from_amax (per-row w2) -> w2
  mlp_now      stream GEMV with add + norm + SwiGLU -> act_quant_from_amax -> w2 (fastpath.add_norm_mlp)
  qkv_before / qkv_now   add_rms_norm -> stream GEMV (the qkv projection)  vs  one fused GEMV
  parts        the gate/up GEMV alone with and without SwiGLU, the one-program SwiGLU+quant, the
               quantization from absmaxes
Outputs are compared with the separate kernels' (bit for bit, or the fraction of equal elements: the
fused norm's sum of squares adds in another order).

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
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a, w4a8_gemv_stream_fused, w4a8_gemv_swiglu
from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_q
from lowbit.llm import fastpath
from lowbit.llm.model import RMSNorm

MODELS = [("llama-2-7b", 4096, 11008, 12288), ("llama-3-8b", 4096, 14336, 6144)]


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
    for name, dim, f, n_qkv in MODELS:
        for gs in (None, 128):
            norm = RMSNorm(dim, 1e-5).to("cuda", bf)
            w13, w2, wqkv = _linear(2 * f, dim, gs), _linear(dim, f, gs), _linear(n_qkv, dim, gs)
            qw, q2, qq = w13.weight, w2.weight, wqkv.weight
            for m in args.tokens:
                x = torch.randn(1, m, dim, device="cuda", dtype=bf)
                d = torch.randn(1, m, dim, device="cuda", dtype=bf)
                x2, d2 = x.view(m, dim), d.view(m, dim)
                y = fused.add_rms_norm(x, d, norm.weight, 1e-5)[1].reshape(m, dim)

                pre = q2.takes_prequantized(torch.empty(m, f, device="cuda", dtype=bf))

                def down(act, amax=None):  # act: [gate; up] (amax None) or the SwiGLU output
                    if pre:
                        qa, sa = fused.swiglu_quant(act) if amax is None else act_quant_from_amax(act, amax)
                        return w4a8_gemv_q(qa, sa, q2.qdata, q2.scale, None, q2.group_size, bf)
                    return w4a8_gemv_dp4a(act if amax is not None else fused.swiglu(act), q2.qdata, q2.scale,
                                          None, q2.group_size)

                def mlp_before():
                    _, yy = fused.add_rms_norm(x2, d2, norm.weight, 1e-5)
                    return down(w4a8_gemv_dp4a(yy, qw.qdata, qw.scale, None, qw.group_size, kernel="stream"))

                def mlp_swiglu():
                    _, yy = fused.add_rms_norm(x2, d2, norm.weight, 1e-5)
                    return down(*w4a8_gemv_swiglu(yy, qw.qdata, qw.scale, None, qw.group_size))

                def mlp_now():
                    return fastpath.add_norm_mlp(norm, w13, w2, x, d)[1].view(m, dim)

                def qkv_before():
                    _, yy = fused.add_rms_norm(x2, d2, norm.weight, 1e-5)
                    return w4a8_gemv_dp4a(yy, qq.qdata, qq.scale, None, qq.group_size, kernel="stream")

                def qkv_now():
                    return w4a8_gemv_stream_fused(x2, qq.qdata, qq.scale, None, qq.group_size, residual=d2,
                                                  norm=(norm.weight, 1e-5))[1]

                h, amax = w4a8_gemv_swiglu(y, qw.qdata, qw.scale, None, qw.group_size)
                gu2 = w4a8_gemv_dp4a(y, qw.qdata, qw.scale, None, qw.group_size, kernel="stream")
                t = {"mlp_before": timeit_graphed(mlp_before), "mlp_swiglu": timeit_graphed(mlp_swiglu),
                     "mlp_now": timeit_graphed(mlp_now),
                     "qkv_before": timeit_graphed(qkv_before), "qkv_now": timeit_graphed(qkv_now),
                     "gate_up_stream": timeit_graphed(
                         lambda: w4a8_gemv_dp4a(y, qw.qdata, qw.scale, None, qw.group_size, kernel="stream")),
                     "gate_up_stream_swiglu": timeit_graphed(
                         lambda: w4a8_gemv_swiglu(y, qw.qdata, qw.scale, None, qw.group_size)),
                     "swiglu_quant": timeit_graphed(lambda: fused.swiglu_quant(gu2)),
                     "quant_from_amax": timeit_graphed(lambda: act_quant_from_amax(h, amax))}
                ref = mlp_before()
                rows.append({"model": name, "dim": dim, "F": f, "N_qkv": n_qkv, "group_size": gs, "M": m,
                             "us": t, "mlp_swiglu_equal": bool(torch.equal(mlp_swiglu(), ref)),
                             "mlp_now_equal_fraction": (mlp_now() == ref).float().mean().item(),
                             "qkv_now_equal_fraction": (qkv_now() == qkv_before()).float().mean().item(),
                             "takes_fused_mlp": bool(qw.streams_swiglu(x))})
                r = rows[-1]
                print(f"{name} g={gs or 'row'} M={m} " + " ".join(f"{a}={b:.1f}" for a, b in t.items())
                      + f" equal={r['mlp_swiglu_equal']}/{r['mlp_now_equal_fraction']:.4f}/"
                        f"{r['qkv_now_equal_fraction']:.4f}", flush=True)
    print("\n| model | scales | M | MLP before | + SwiGLU epilogue | + add/norm prologue | qkv before | qkv fused |"
          " gate/up stream | with SwiGLU | SwiGLU+quant (1 program) | quant from absmax |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["us"]
        print(f"| {r['model']} | {r['group_size'] or 'row'} | {r['M']} | {t['mlp_before']:.1f} | "
              f"{t['mlp_swiglu']:.1f} | {t['mlp_now']:.1f} | {t['qkv_before']:.1f} | {t['qkv_now']:.1f} | "
              f"{t['gate_up_stream']:.1f} | {t['gate_up_stream_swiglu']:.1f} | {t['swiglu_quant']:.1f} | "
              f"{t['quant_from_amax']:.1f} |")
    if args.out:
        write_probe_json(args.out, rows, GRAPHED_TIMING)


if __name__ == "__main__":
    main()
