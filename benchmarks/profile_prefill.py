"""Prefill (TTFT) of a random-weight Llama with the eager fast path on and off, same process.

Usage: python benchmarks/profile_prefill.py [--model llama-2-7b] [--quants none,w4a8]
       [--prompt-len 8192] [--group-size 0] [--out FILE.json]
For each format: loads the model once, times `--reps` prefills (median, synchronized) with
LOWBIT_FUSED=0 (plain eager ops; the linears quantize their own inputs) and LOWBIT_FUSED=1
(fused RMSNorm / RoPE / SwiGLU; W4A8 activations quantized inside the norm / SwiGLU kernels),
alternating, then profiles one prefill of each and prints the top CUDA kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import triton

from lowbit.bench import git_sha
from lowbit.llm.harness import LoadOptions, load
from lowbit.llm.loading import make_quantizer
from lowbit.llm.phased import Phase, use_phase


def prefill_s(model, prompt: torch.Tensor) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), use_phase(model, Phase.PREFILL):
        model(prompt, torch.arange(prompt.shape[1], device=prompt.device), prefill=True, last_only=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def top_kernels(model, prompt: torch.Tensor, n: int) -> list[dict]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        prefill_s(model, prompt)
    rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return [{"kernel": k[:90], "ms": t / 1e3, "share": t / total, "calls": c} for k, t, c in rows[:n]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--quants", default="none,w4a8")
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--group-size", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    for quant in a.quants.split(","):
        group = None if quant == "none" else a.group_size
        quantizer = make_quantizer(quant, group_size=group)
        loaded = load(LoadOptions(model=a.model, random_weights=True, quant=quant, device="cuda",
                                  dtype="bfloat16", group_size=group), quantizer=quantizer)
        model = loaded.model
        prompt = torch.randint(0, model.args.vocab_size, (1, a.prompt_len), device="cuda")
        model.setup_caches(1, a.prompt_len + 8)
        times: dict[str, list[float]] = {"0": [], "1": []}
        for mode in ("0", "1"):  # warm-up: Triton compiles, autotuning, cuDNN plans
            os.environ["LOWBIT_FUSED"] = mode
            prefill_s(model, prompt)
        for _ in range(a.reps):
            for mode in ("0", "1"):
                os.environ["LOWBIT_FUSED"] = mode
                times[mode].append(prefill_s(model, prompt))
        row = {"quant": quant, "prompt_len": a.prompt_len}
        for mode, label in (("0", "eager_ops"), ("1", "fused")):
            row[f"ttft_s_{label}"] = statistics.median(times[mode])
            os.environ["LOWBIT_FUSED"] = mode
            row[f"top_kernels_{label}"] = top_kernels(model, prompt, a.top)
        rows.append(row)
        print(f"{quant:>6}: prefill {a.prompt_len} tokens  eager ops {row['ttft_s_eager_ops'] * 1e3:.1f} ms"
              f"  fused {row['ttft_s_fused'] * 1e3:.1f} ms", flush=True)
        for label in ("eager_ops", "fused"):
            print(f"  top kernels ({label}):")
            for k in row[f"top_kernels_{label}"]:
                print(f"    {k['ms']:8.2f} ms {k['share'] * 100:5.1f}% x{k['calls']:<4} {k['kernel']}")
        model.free_caches()
        del loaded, model
        gc.collect()
        torch.cuda.empty_cache()
    by = {r["quant"]: r for r in rows}
    if "none" in by:
        for q, r in by.items():
            if q != "none":
                for label in ("eager_ops", "fused"):
                    ratio = r[f"ttft_s_{label}"] / by["none"][f"ttft_s_{label}"]
                    print(f"TTFT {q} / bf16 ({label}): {ratio:.3f}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": triton.__version__, "git_sha": git_sha(),
                "model": a.model, "group_size": a.group_size, "reps": a.reps}
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
