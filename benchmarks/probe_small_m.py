"""Probe: W4A8 at 2-4 tokens on the Triton path (the streaming dp4a GEMV and its alternatives).

Times, per shape, CUDA-graph replays with L2 flushed (bench_linear's timing):
  part "stream": the streaming GEMV launched directly at M = 3 on 3 rows, at M = 2 / 3 / 4 on a
  4-row tensor (same 4-row block: BLOCK_M = 4), and on all-ones rows;
  part "long_k": at M = 2 / 3 / 4, F.linear on a kernel=TRITON weight (`auto`: AUTO's route
  without the native extension), the blocked dp4a kernel
  (`blocked`), act_quant alone (`aq`), gemv_q from int8 rows (`gemv_q`), act_quant + gemv_q and
  act_quant + the Triton decode kernel, and bf16.

    python benchmarks/probe_small_m.py [--out results/probe_gemv_stream_m3_h100.json]

The first run (sha 3db3150, before the fixes; its printout is in
results/probe_gemv_stream_m3_3db3150_h100.txt) found the streaming GEMV about 2x slower whenever
M < BLOCK_M, and AUTO at 2-4 tokens with K > 8192 on the blocked kernel (3-4x slower than
act_quant + gemv_q).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from bench_linear import timeit_graphed, write_probe_json

import lowbit
import lowbit.kernels.w4a8.gemv_stream as gs
from lowbit.core.kernel_choice import KernelChoice
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.decode import w4_decode
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a
from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_q


def stream_rows(x, words, scale, out, m_arg: int, cfg: dict):
    """The streaming GEMV on x's rows with M = m_arg (BLOCK_M from x's row count)."""
    m, k = x.shape
    n = words.shape[0]
    args = (x, words, scale, scale, out, m_arg, n, k, k // 32, x.stride(0), words.stride(0), scale.stride(0),
            out.stride(0))
    flags = dict(GROUP=0, HAS_BIAS=False, USE_ASM=True, BLOCK_M=triton.next_power_of_2(m),
                 K_PAD=triton.next_power_of_2(k))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gs._w4a8_stream_kernel[(min(triton.cdiv(n, cfg["BLOCK_N"]), sms * cfg["PPS"]),)](*args, **flags, **cfg)
    return out


def weight(n: int, k: int):
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    return w, lowbit.W4A8Config(group_size=None, kernel=KernelChoice.TRITON).quantize_weight(w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for n, k in [(1024, 4096), (12288, 4096)]:
        _, qw = weight(n, k)
        words = qw.qdata.view(torch.int32)
        cfg = gs.stream_config(3, n, k)
        x3 = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
        x4 = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
        o3 = torch.empty(3, n, device="cuda", dtype=torch.bfloat16)
        o4 = torch.empty(4, n, device="cuda", dtype=torch.bfloat16)
        ones = torch.ones(3, k, device="cuda", dtype=torch.bfloat16)
        t = {"m3": timeit_graphed(lambda: stream_rows(x3, words, qw.scale, o3, 3, cfg)),
             "x4_m2": timeit_graphed(lambda: stream_rows(x4, words, qw.scale, o4, 2, cfg)),
             "x4_m3": timeit_graphed(lambda: stream_rows(x4, words, qw.scale, o4, 3, cfg)),
             "x4_m4": timeit_graphed(lambda: stream_rows(x4, words, qw.scale, o4, 4, cfg)),
             "m3_ones": timeit_graphed(lambda: stream_rows(ones, words, qw.scale, o3, 3, cfg))}
        rows.append({"part": "stream", "N": n, "K": k, "us": t})
        print(f"stream {n}x{k} " + " ".join(f"{a}={b:.1f}" for a, b in t.items()), flush=True)
    for n, k in [(4096, 11008), (4096, 14336), (4096, 4096), (12288, 4096)]:
        w, qw = weight(n, k)
        for m in (2, 3, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            qa, sa = act_quant(x)
            g = qw.group_size
            t = {"auto": timeit_graphed(lambda: F.linear(x, qw)),
                 "blocked": timeit_graphed(lambda: w4a8_gemv_dp4a(x, qw.qdata, qw.scale, None, g, kernel="blocked")),
                 "aq": timeit_graphed(lambda: act_quant(x)),
                 "gemv_q": timeit_graphed(lambda: w4a8_gemv_q(qa, sa, qw.qdata, qw.scale, None, g, torch.bfloat16)),
                 "aq_gemv_q": timeit_graphed(
                     lambda: w4a8_gemv_q(*act_quant(x), qw.qdata, qw.scale, None, g, torch.bfloat16)),
                 "aq_decode": timeit_graphed(
                     lambda: w4_decode(*act_quant(x), qw.qdata, qw.scale, None, None, g, torch.bfloat16)),
                 "bf16": timeit_graphed(lambda: F.linear(x, w))}
            rows.append({"part": "long_k", "N": n, "K": k, "M": m, "us": t})
            print(f"long_k {n}x{k} M={m} " + " ".join(f"{a}={b:.1f}" for a, b in t.items()), flush=True)
    if args.out:
        write_probe_json(args.out, rows)


if __name__ == "__main__":
    main()
