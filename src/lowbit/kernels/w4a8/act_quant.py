"""Per-token symmetric int8 quantization of activations, one pass over HBM.

    x (M, K) fp16/bf16/fp32  ->  q (M, K) int8 in [-127, 127],  s (M,) float32
    s[m] = max_k |x[m, k]| / 127          q = round_half_even(x / s)

One program per row: the row is read once from HBM for the max, the second
read (quantize) hits L1/L2, and q is written once. Division is IEEE (div_rn) and
rounding is half-to-even so q equals the pure-torch reference bit for bit.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from lowbit.kernels import interpreter_enabled

PERM_CHUNK = 128  # K chunk of the permuted layout (see act_quant(permute=True))


@triton.jit
def _int8_scale(amax):
    """Per-token scale amax / 127 (IEEE division), floored at FLT_MIN so all-zero rows stay finite."""
    return tl.maximum(tl.math.div_rn(amax, 127.0), 1.1754943508222875e-38)


@triton.jit
def _int8_round_clamp(v, scale):
    """round_half_even(v / scale) clamped to [-127, 127], in fp32: bit-identical to the reference.

    Adding and subtracting 1.5 * 2**23 rounds an fp32 |v| < 2**22 to the nearest even integer.
    """
    r = (tl.math.div_rn(v, scale) + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -127.0), 127.0)


@triton.jit
def act_quant_row(row, x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                  ONE_PASS: tl.constexpr, PERMUTE: tl.constexpr):
    """Quantize one row (the body of _act_quant_kernel; also called by fused launches)."""
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    if ONE_PASS:
        # -- the whole row lives in registers: one HBM read, one write ---------------------
        offs = tl.arange(0, BLOCK_K)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = _int8_scale(tl.max(tl.abs(v), axis=0))
        tl.store(s_ptr + row, scale)
        r = _int8_round_clamp(v, scale).to(tl.int8)
        if PERMUTE:  # per 128-chunk: the 64 even columns, then the 64 odd ones
            r = tl.reshape(tl.permute(tl.reshape(r, (BLOCK_K // 128, 64, 2)), (0, 2, 1)), (BLOCK_K,))
        tl.store(q_row + offs, r, mask=offs < K)
    else:
        # -- long rows: absmax pass, then quantize (the re-read hits L2) ---------------------
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = _int8_scale(tl.max(amax, axis=0))
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            r = _int8_round_clamp(v, scale).to(tl.int8)
            if PERMUTE:
                r = tl.reshape(tl.permute(tl.reshape(r, (BLOCK_K // 128, 64, 2)), (0, 2, 1)), (BLOCK_K,))
            tl.store(q_row + offs, r, mask=offs < K)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                      ONE_PASS: tl.constexpr, PERMUTE: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:  # let a kernel launched with programmatic dependent launch start now (see act_quant)
        gdc_launch_dependents()
    act_quant_row(tl.program_id(0), x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K, ONE_PASS, PERMUTE)


def act_quant_launch(k: int, m: int) -> tuple[int, bool, int]:
    """(BLOCK_K, ONE_PASS, num_warps) for m rows of length k."""
    # NOTE: H100, 8192 rows: K=4096 one pass 41 us (2.5 TB/s); K=11008 one pass (16384-wide
    # block) 269 us vs two passes of 4096 137 us, so rows above 8192 take two passes. At prefill
    # sizes two passes of 2048 with 8 warps beat 4096 with 4 (results/probe_tma_gemm_h100.json,
    # "act_quant"): K=11008 125.1 vs 129.5 us, K=14336 148.5 vs 167.1 us (M=8192); 42.5 vs 47.5,
    # 50.1 vs 60.7 (M=2048). Decode batches with rows past 16384 keep two 4096 x 4-warp passes:
    # the longer serial chunk loop of a 2048 block was not measured there.
    # Decode batches (m < 64) with 8192 < K <= 16384 are latency-bound: the whole row in one
    # 16384-wide pass with 16 warps (results/probe_act_quant_decode_h100.json, M = 1..32: K=11008
    # 9.2-9.7 us vs 13.3-14.0 for two 4096-wide passes with 4 warps, K=14336 8.8-9.2 vs 15.1-15.6);
    # at K=4096 the one-pass 4096 block with 8 warps (6.2-6.5 us at M=1..32 vs 6.3-7.0 with 4).
    if k <= 8192:
        block = max(triton.next_power_of_2(k), 128)
        return block, True, (4 if block < 4096 or (block == 4096 and m >= 64) else 8)
    if m < 64 and k <= 16384:
        return 16384, True, 16
    return (2048, False, 8) if m >= 64 else (4096, False, 4)


@functools.cache
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_trigger_ok(x: torch.Tensor) -> bool:
    """True when act_quant(x, trigger_dependents=True) really triggers (CUDA, sm_90+, compiled Triton)."""
    if not x.is_cuda or interpreter_enabled():
        return False
    return _sm90(x.device.index if x.device.index is not None else torch.cuda.current_device())


def empty_quantized(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized per-token int8 rows (m, k) and their float32 scales (m, 1)."""
    return (torch.empty((m, k), dtype=torch.int8, device=device),
            torch.empty((m, 1), dtype=torch.float32, device=device))


def act_quant(x: torch.Tensor, permute: bool = False,
              trigger_dependents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (q int8 (M, K), scale float32 (M, 1)).

    permute=True stores each 128-column chunk as its 64 even columns followed by its 64
    odd columns (K must be a multiple of 128): the order in which the swapped W4A8 GEMM
    consumes the low and high nibbles of the packed weight.

    trigger_dependents=True (where pdl_trigger_ok(x)): every program first lets the next kernel on
    the stream start, if that one is launched with programmatic dependent launch (the mma decode
    kernel, `cutlass.w4a8.mma_gemm(pdl=True)`), which then waits for q and scale before reading
    them. Ignored elsewhere.
    """
    if x.dim() != 2:
        raise ValueError(f"act_quant expects a 2-D (tokens, K) tensor, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if permute and k % PERM_CHUNK:
        raise ValueError(f"permuted activation layout needs K % {PERM_CHUNK} == 0, got K={k}")
    q, s = empty_quantized(m, k, x.device)
    if m == 0:
        return q, s
    block, one_pass, num_warps = act_quant_launch(k, m)
    _act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one_pass,
                            PERMUTE=permute, TRIGGER=trigger_dependents and pdl_trigger_ok(x),
                            num_warps=num_warps)
    return q, s


@triton.jit
def _act_quant_amax_kernel(x_ptr, amax_ptr, q_ptr, s_ptr, K, P, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                           BLOCK_P: tl.constexpr):
    # program (row, chunk): the row's absmax from P partial maxima, then BLOCK_K columns
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    scale = _int8_scale(tl.max(tl.load(amax_ptr + row * P + p, mask=p < P, other=0.0), axis=0))
    if chunk == 0:
        tl.store(s_ptr + row, scale)
    offs = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    v = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * stride_qm + offs, _int8_round_clamp(v, scale).to(tl.int8), mask=offs < K)


def act_quant_from_amax(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant(x) when each row's absmax is already known as P partial maxima, amax (M, P)
    float32 (e.g. from the kernel that wrote x: gemv_dp4a.w4a8_gemv_swiglu): no pass over the row
    before quantizing, so many programs share a row. Same q and scale as act_quant(x) when
    max(amax[m]) == max|x[m]|."""
    if x.dim() != 2 or amax.dim() != 2 or amax.shape[0] != x.shape[0] or amax.dtype != torch.float32:
        raise ValueError(f"act_quant_from_amax: x (M, K) and amax (M, P) float32, got {tuple(x.shape)} and "
                         f"{tuple(amax.shape)} {amax.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    amax = amax.contiguous()
    m, k = x.shape
    q, s = empty_quantized(m, k, x.device)
    if m == 0 or k == 0:
        s.fill_(torch.finfo(torch.float32).tiny)
        return q, s
    block = 1024
    _act_quant_amax_kernel[(m, triton.cdiv(k, block))](
        x, amax, q, s, k, amax.shape[1], x.stride(0), q.stride(0), BLOCK_K=block,
        BLOCK_P=max(triton.next_power_of_2(amax.shape[1]), 2), num_warps=4)
    return q, s


def act_quant_traceable(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant's math in plain torch ops: (M, K) -> (q int8 (M, K), scale float32 (M, 1)).

    For torch.compile'd graphs: Inductor fuses these ops into the kernel that produces x (the
    RMSNorm or SwiGLU before a W4A8 linear), so the quantization costs no launch and no pass
    over HBM of its own. Both divisions run in float64 and are rounded to float32: Inductor
    emits Triton's float32 `/` (an approximate division) and turns a division by a constant
    into a multiply by its reciprocal, while a float64 quotient rounded to float32 is the
    IEEE float32 quotient (double rounding is harmless at 53 >= 2 * 24 + 2 bits), and
    amax * fl64(1/127) is never close enough to a float32 rounding boundary to round the other
    way (amax has at most 24 significant bits). Same q and scale as act_quant on the same x.
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax.to(torch.float64) / 127.0).to(torch.float32).clamp(min=torch.finfo(torch.float32).tiny)
    v = (xf.to(torch.float64) / scale.to(torch.float64)).to(torch.float32)
    return torch.round(v).clamp(-127.0, 127.0).to(torch.int8), scale
