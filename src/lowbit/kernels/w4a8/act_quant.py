"""Per-token symmetric int8 quantization of activations, one pass over HBM.

    x (M, K) fp16/bf16/fp32  ->  q (M, K) int8 in [-127, 127],  s (M,) float32
    s[m] = max_k |x[m, k]| / 127          q = round_half_even(x / s)

One program per row: the row is read once from HBM for the max, the second
read (quantize) hits L1/L2, and q is written once. Division is IEEE (div_rn) and
rounding is half-to-even so q equals the pure-torch reference bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 1.5 * 2**23: adding and subtracting it rounds an fp32 |v| < 2**22 to the nearest even integer.
ROUND_MAGIC = 12582912.0


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    # -- pass 1: row absmax ------------------------------------------------------------
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.math.div_rn(tl.max(amax, axis=0), 127.0)
    scale = tl.maximum(scale, 1.1754943508222875e-38)  # float32 tiny, as the reference clamps
    tl.store(s_ptr + row, scale)
    # -- pass 2: quantize (row is cache-resident now) -----------------------------------
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        r = (tl.math.div_rn(v, scale) + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_row + offs, r.to(tl.int8), mask=offs < K)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (q int8 (M, K), scale float32 (M, 1)). x must have a unit last stride."""
    if x.dim() != 2:
        raise ValueError(f"act_quant expects a 2-D (tokens, K) tensor, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    block = min(triton.next_power_of_2(k), 4096)
    num_warps = 4 if block <= 2048 else 8
    _act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block, num_warps=num_warps)
    return q, s
