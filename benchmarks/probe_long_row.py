"""Probe: one token of W4A8 on the Triton path, the fused-quantization streaming GEMV against
act_quant + the pre-quantized gemv_q, alone and behind the kernel that produces the activations.

Per shape (Llama-2-7B / Llama-3-8B linears, per-row and g128 weights), CUDA-graph replays with L2
flushed (bench_linear's timing), one token:
  stream         the streaming dp4a GEMV (quantizes in its prologue; next_pow2(K) words per row tile)
  aq_gemv_q      act_quant + gemv_q (K walked in chunks)
  auto           F.linear on a kernel=TRITON weight (what AUTO runs without the native extension)
  tinygemm, bf16 the peers, same run
and, behind the producer of the activations as in the eager decode step:
  K = 4096:      lowbit's RMSNorm + stream  vs  RMSNorm-with-quantization + gemv_q
  K > 8192:      lowbit's SwiGLU + stream   vs  SwiGLU-with-quantization + gemv_q

    python benchmarks/probe_long_row.py [--out results/probe_long_row_h100.json]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_linear import GRAPHED_TIMING, timeit_graphed, tinygemm_weight, write_probe_json

import lowbit
from lowbit.core.kernel_choice import KernelChoice
from lowbit.kernels import fused
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a
from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_q

SHAPES = [(4096, 11008), (4096, 14336), (4096, 4096), (12288, 4096), (22016, 4096), (14336, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    bf = torch.bfloat16
    for n, k in SHAPES:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(bf)
        wp, sz, _ = tinygemm_weight(w, 128)
        x = torch.randn(1, k, device="cuda", dtype=bf)
        for gs in (None, 128):
            qw = lowbit.W4A8Config(group_size=gs, kernel=KernelChoice.TRITON).quantize_weight(w)
            g = qw.group_size

            def gemv_q(qa, sa, qw=qw, g=g):
                return w4a8_gemv_q(qa, sa, qw.qdata, qw.scale, None, g, bf)

            def stream(x, qw=qw, g=g):
                return w4a8_gemv_dp4a(x, qw.qdata, qw.scale, None, g, kernel="stream")

            t = {"stream": timeit_graphed(lambda: stream(x)),
                 "aq_gemv_q": timeit_graphed(lambda: gemv_q(*act_quant(x))),
                 "auto": timeit_graphed(lambda: F.linear(x, qw)),
                 "tinygemm": timeit_graphed(lambda: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz)),
                 "bf16": timeit_graphed(lambda: F.linear(x, w))}
            y_ref = stream(x)
            exact = bool(torch.equal(gemv_q(*act_quant(x)), y_ref))
            if k == 4096:
                h = torch.randn(1, k, device="cuda", dtype=bf)
                nw = torch.rand(k, device="cuda", dtype=bf) + 0.5
                t["producer_stream"] = timeit_graphed(lambda: stream(fused.rms_norm(h, nw, 1e-5)))
                t["producer_q_gemv_q"] = timeit_graphed(lambda: gemv_q(*fused.rms_norm_quant(h, nw, 1e-5)))
                exact_p = bool(torch.equal(stream(fused.rms_norm(h, nw, 1e-5)),
                                           gemv_q(*fused.rms_norm_quant(h, nw, 1e-5))))
            else:
                gu = torch.randn(1, 2 * k, device="cuda", dtype=bf)
                t["producer_stream"] = timeit_graphed(lambda: stream(fused.swiglu(gu)))
                t["producer_q_gemv_q"] = timeit_graphed(lambda: gemv_q(*fused.swiglu_quant(gu)))
                exact_p = bool(torch.equal(stream(fused.swiglu(gu)), gemv_q(*fused.swiglu_quant(gu))))
            rows.append({"N": n, "K": k, "group_size": gs, "us": t, "gemv_q_equals_stream": exact,
                         "producer_outputs_equal": exact_p})
            print(f"{n}x{k} g={gs or 'row'} " + " ".join(f"{a}={b:.1f}" for a, b in t.items())
                  + f" equal={exact}/{exact_p}", flush=True)
    print("\n| N x K | scales | stream | act_quant + gemv_q | AUTO | tinygemm | bf16 | producer + stream |"
          " producer-quant + gemv_q |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["us"]
        print(f"| {r['N']}x{r['K']} | {r['group_size'] or 'row'} | {t['stream']:.1f} | {t['aq_gemv_q']:.1f} | "
              f"{t['auto']:.1f} | {t['tinygemm']:.1f} | {t['bf16']:.1f} | {t['producer_stream']:.1f} | "
              f"{t['producer_q_gemv_q']:.1f} |")
    if args.out:
        write_probe_json(args.out, rows, GRAPHED_TIMING + ", M=1")


if __name__ == "__main__":
    main()
