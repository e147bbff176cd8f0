"""Profile decode steps of a random-weight Llama: GPU kernel time per step vs wall time.

Usage: python benchmarks/profile_decode.py [--model llama-2-7b] [--quant w4a8] [--group-size 0] [--cuda-graph]
Prints the top CUDA kernels of 8 decode steps and whether the step ran as one CUDA graph. The step is
compiled (mode="reduce-overhead"), or with --cuda-graph the eager step captured as a CUDA graph
(what `lowbit generate` runs by default).
"""

from __future__ import annotations

import argparse
import time

import torch

from lowbit.llm.generate import Generator, Sampling
from lowbit.llm.harness import LoadOptions, load
from lowbit.llm.loading import make_quantizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--quant", default="w4a8")
    ap.add_argument("--group-size", type=int, default=0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="KV cache length (default: just enough; bench_llm uses prompt + new tokens = 160)")
    ap.add_argument("--rows", type=int, default=18, help="kernels listed")
    ap.add_argument("--cuda-graph", action="store_true", help="the eager step as a CUDA graph, not compiled")
    args = ap.parse_args()
    quantizer = make_quantizer(args.quant, group_size=args.group_size)
    loaded = load(LoadOptions(model=args.model, random_weights=True, quant=args.quant, device="cuda",
                              dtype="bfloat16"), quantizer=quantizer)
    model = loaded.model
    prompt = torch.randint(0, model.args.vocab_size, (args.batch, 32), device="cuda")
    model.setup_caches(args.batch, args.max_seq_len or 32 + 3 + 2 * args.steps + 8)
    if args.cuda_graph:
        gen = Generator(model, Sampling(), cuda_graph=True)
    else:
        gen = Generator(model, Sampling(), compile=True, compile_mode="reduce-overhead")
    gen.warmup(prompt)
    gen.generate(prompt, args.steps)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        res = gen.generate(prompt, args.steps)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"decode {res.decode_tokens_per_s:.1f} tok/s (profiled, wall {wall * 1e3:.1f} ms for "
          f"prefill + {args.steps} steps)")
    ka = prof.key_averages()
    names = [e.key for e in ka]
    print("cudaGraphLaunch calls:", sum(e.count for e in ka if "GraphLaunch" in e.key),
          "| cuLaunchKernel/cudaLaunchKernel calls:",
          sum(e.count for e in ka if "LaunchKernel" in e.key), "|", len(names), "distinct events")
    print(ka.table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
