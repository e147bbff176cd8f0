"""Time lowbit's per-token act_quant (one-pass and two-pass rows) at decode and prefill token counts.

Usage: python benchmarks/time_act_quant.py  (CUDA-graph replays, L2 flushed by do_bench, medians)
"""

from __future__ import annotations

import torch
import triton

from lowbit.bench import time_cuda_graphed
from lowbit.kernels.w4a8.act_quant import _act_quant_kernel


def main() -> None:
    for m in (1, 16, 8192):
        for k in (4096, 11008):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q = torch.empty(m, k, dtype=torch.int8, device="cuda")
            s = torch.empty(m, 1, device="cuda")
            res = {}
            for name, one, block, warps in (("two-pass 4096", False, 4096, 8), ("two-pass 2048", False, 2048, 4),
                                            ("one-pass", True, triton.next_power_of_2(k), 8),
                                            ("one-pass w16", True, triton.next_power_of_2(k), 16)):
                def run():
                    _act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one,
                                            PERMUTE=False, num_warps=warps)
                res[name] = time_cuda_graphed(run)
            print(f"act_quant M={m} K={k}: " + "  ".join(f"{n} {us:.1f} us" for n, us in res.items()), flush=True)


if __name__ == "__main__":
    main()
