"""A W4A8 problem whose float epilogue is exact, for checking a kernel's integer accumulation."""

from __future__ import annotations

import torch

from lowbit.core.packing import unpack_int4


def power_of_two_case(m: int, n: int = 256, k: int = 4096, device: str = "cuda"):
    """Random int8 activations (M, K) and packed int4 weights (N, K/2) with scales 2**-3 (token)
    and 2**-5 (row): (acc * s_w) * s_a is then exact in float32, so a correct kernel returns the
    int32 dot rounded once to bf16.

    Returns (qa, sa, packed, sw, acc) with acc the exact int64 dot (M, N) computed on the CPU.
    """
    qa = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    sa = torch.full((m, 1), 2.0**-3, device=device)
    sw = torch.full((n, 1), 2.0**-5, dtype=torch.bfloat16, device=device)
    acc = qa.cpu().to(torch.int64) @ unpack_int4(packed.cpu()).to(torch.int64).t()
    return qa, sa, packed, sw, acc
