"""Decode attention over a static KV cache: lowbit's kernel vs the masked SDPA it replaces.

Usage: python benchmarks/bench_decode_attention.py [--out FILE.json]
Both are timed as CUDA-graph replays (as in the compiled decode step), same process, same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import torch
import triton

from lowbit.bench import time_cuda_graphed as t_us
from lowbit.kernels.attention import decode_attention, num_splits
from lowbit.llm.model import masked_cache_attention

# (batch, heads, kv heads, cache length, pos): Llama-2-7B (32/32) and Llama-3-8B (32/8), head_dim 128
CASES = [(16, 32, 32, 160, 40), (16, 32, 32, 160, 100), (16, 32, 32, 160, 159), (1, 32, 32, 160, 100),
         (1, 32, 32, 4096, 1000), (1, 32, 32, 4096, 4095), (1, 32, 8, 8192, 2000), (16, 32, 8, 2048, 1000)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="decode_attention.json")
    args = ap.parse_args()
    rows = []
    print(f"{'B':>3} {'H':>3} {'KV':>3} {'S':>5} {'pos':>5} | {'sdpa us':>8} {'lowbit us':>9} {'x':>6}")
    for b, h, kv, s, p in CASES:
        q = torch.randn(b, 1, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        kc = torch.randn(b, kv, s, 128, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        pos = torch.tensor([p], device="cuda")
        err = (decode_attention(q, kc, vc, pos).float() - masked_cache_attention(q, kc, vc, pos).float()).abs().max().item()
        sd = t_us(lambda: masked_cache_attention(q, kc, vc, pos))
        lb = t_us(lambda: decode_attention(q, kc, vc, pos))
        rows.append({"batch": b, "heads": h, "kv_heads": kv, "cache": s, "pos": p, "sdpa_us": sd,
                     "lowbit_us": lb, "speedup": sd / lb, "max_abs_diff": err})
        print(f"{b:>3} {h:>3} {kv:>3} {s:>5} {p:>5} | {sd:8.1f} {lb:9.1f} {sd / lb:6.2f}  (max diff {err:.3g})",
              flush=True)
    # back to back: 32 calls on distinct caches in one graph (a decode step's 32 layers), per split count
    print("\nback to back x32 (us per call), by cache splits:")
    seq = []
    for b, h, kv, s, p in [(1, 32, 32, 160, 100), (1, 32, 32, 160, 159), (1, 32, 32, 1024, 600),
                           (1, 32, 32, 4096, 1000), (16, 32, 32, 160, 100)]:
        q = torch.randn(b, 1, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        caches = [(torch.randn(b, kv, s, 128, device="cuda", dtype=torch.bfloat16),
                   torch.randn(b, kv, s, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(32)]
        pos = torch.tensor([p], device="cuda")
        t = {"rule": t_us(lambda: [decode_attention(q, kc, vc, pos) for kc, vc in caches]) / 32,
             "rule_splits": num_splits(b * kv, s)}
        for n in (1, 2, 4, 8):
            t[f"splits_{n}"] = t_us(lambda: [decode_attention(q, kc, vc, pos, splits=n) for kc, vc in caches]) / 32
        seq.append({"batch": b, "heads": h, "kv_heads": kv, "cache": s, "pos": p, **t})
        print(f"  B={b} KV={kv} S={s} pos={p}: " + "  ".join(f"{k2} {v2:.1f}" if isinstance(v2, float) else
                                                          f"{k2} {v2}" for k2, v2 in t.items()), flush=True)
    sha = os.environ.get("LOWBIT_GIT_SHA") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git_sha": sha}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "back_to_back": seq}, f, indent=1)


if __name__ == "__main__":
    main()
