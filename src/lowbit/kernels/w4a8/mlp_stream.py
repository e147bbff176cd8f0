"""The W4A8 feed-forward of 1-4 decode tokens in one persistent launch: w2(silu(x w1) * (x w3)).

Three phases of one cooperative grid, separated by grid barriers (kernels/grid.py):

  1. the [gate; up] streaming GEMV with its SwiGLU epilogue (gemv_stream, SWIGLU): h (M, F) and
     each program's absmax of its outputs per token;
  2. each program quantizes a slice of h to int8 with the row's scale from those maxima
     (act_quant_from_amax's arithmetic);
  3. the down projection on the int8 rows (gemv_q's row blocks, walked persistently).

Before the first barrier each program prefetches its first down-projection rows into L2, so HBM
keeps streaming weights while the barriers and the quantization run. The chain this replaces is
three launches (w4a8_gemv_swiglu, act_quant_from_amax, w4a8_gemv_q) with the same integers and
roundings: the outputs are equal bit for bit. Under TRITON_INTERPRET each phase is its own
launch (a barrier cannot open when programs run one after another).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowbit.kernels import interpreter_enabled
from lowbit.kernels.grid import cooperative_programs, grid_barrier, sync_buffer
from lowbit.kernels.w4a8.act_quant import _int8_round_clamp, _int8_scale, empty_quantized
from lowbit.kernels.w4a8.gemv_dp4a import num_sms
from lowbit.kernels.w4a8.gemv_q import _gemv_q_rows, gemv_q_config, gemv_q_unsupported
from lowbit.kernels.w4a8.gemv_stream import _programs, _w4a8_stream_kernel, stream_config


@triton.jit
def _prefetch_l2(ptrs, mask):
    """One `prefetch.global.L2::evict_last` per element (a 128-byte line each)."""
    tl.inline_asm_elementwise("@$2 prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l,b",
                              [ptrs, mask], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _w4a8_mlp_kernel(
    x_ptr, w13_ptr, s13_ptr, b13_ptr, h_ptr, amax_ptr, q8_ptr, q32_ptr, sa_ptr, w2_ptr, s2_ptr, b2_ptr,
    out_ptr, sync_ptr,
    M, N13, K, K32, F, KW2, KW24, N2, stride_xm, stride_w13, stride_s13, stride_hm, stride_q8, stride_w2,
    stride_s2, stride_om,
    GROUP13: tl.constexpr, GROUP2: tl.constexpr, HAS_B13: tl.constexpr, HAS_B2: tl.constexpr,
    USE_ASM: tl.constexpr, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    PPS: tl.constexpr, DEPTH: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_W2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, PREFETCH: tl.constexpr, PHASE: tl.constexpr,
    STOP: tl.constexpr = 9,
):
    # PHASE 0: all three phases with grid barriers (cooperative launch); 1-3: that phase only.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_blocks2 = tl.cdiv(N2, BLOCK_N2)
    if PHASE == 0 or PHASE == 1:
        _w4a8_stream_kernel(x_ptr, w13_ptr, s13_ptr, b13_ptr, h_ptr, amax_ptr,
                            s13_ptr, s13_ptr, s13_ptr, s13_ptr, s13_ptr, 1, 0, 0, 0, 0, 0, 0,
                            M, N13, K, K32, stride_xm, stride_w13, stride_s13, stride_hm,
                            GROUP13, HAS_B13, USE_ASM, BLOCK_M, K_PAD, BLOCK_N, PPS, DEPTH, True, False, 1)
    if PHASE == 0:
        if PREFETCH:  # this program's first down-projection rows into L2 while the barriers run
            LINES: tl.constexpr = PREFETCH  # 128-byte lines (32 words) per row, next pow2
            rows = pid * BLOCK_N2 + tl.arange(0, BLOCK_N2)[:, None]
            line = tl.arange(0, LINES)[None, :]
            _prefetch_l2(w2_ptr + rows.to(tl.int64) * stride_w2 + line * 32, (rows < N2) & (line * 32 < KW2))
        grid_barrier(sync_ptr)
    if (PHASE == 0 or PHASE == 2) and STOP > 1:
        cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        for m in range(M):
            pm = tl.load(amax_ptr + m * nprog + p, mask=p < nprog, other=0.0, cache_modifier=".cg")
            scale = _int8_scale(tl.max(pm, axis=0))
            if pid == 0:
                tl.store(sa_ptr + m, scale)
            v = tl.load(h_ptr + m * stride_hm + cols, mask=cols < F, other=0.0, cache_modifier=".cg")
            tl.store(q8_ptr + m * stride_q8 + cols, _int8_round_clamp(v.to(tl.float32), scale).to(tl.int8),
                     mask=cols < F)
    if PHASE == 0 and STOP > 1:
        grid_barrier(sync_ptr)
    if (PHASE == 0 or PHASE == 3) and STOP > 2:
        for blk in range(pid, n_blocks2, nprog):
            _gemv_q_rows(blk, q32_ptr, sa_ptr, w2_ptr, s2_ptr, b2_ptr, out_ptr, M, N2, KW2, KW24,
                         stride_q8 // 4, stride_w2, stride_s2, stride_om, GROUP2, HAS_B2, USE_ASM, BLOCK_M,
                         BLOCK_N2, BLOCK_W2, True)


class _Launch:
    """A resolved launch: grid size and the kernel's constexpr flags."""

    def __init__(self, programs: int, flags: dict, num_warps: int) -> None:
        self.programs = programs
        self.flags = flags
        self.num_warps = num_warps


_LAUNCH: dict[tuple, _Launch] = {}


def _resolve(args: tuple, key: tuple, x: torch.Tensor, n13: int, f: int, flags: dict, cfg: dict,
             prefetch_lines: int) -> _Launch:
    launch = _LAUNCH.get(key)
    if launch is not None:
        return launch
    num_warps = cfg["num_warps"]
    if interpreter_enabled() or not x.is_cuda:
        programs = _programs(n13, cfg["BLOCK_N"], cfg["PPS"], 4, True)
    else:
        sms = num_sms(x.device.index or 0)
        wanted = _programs(n13, cfg["BLOCK_N"], cfg["PPS"], sms, True)
        full = dict(flags, BLOCK_P=max(triton.next_power_of_2(wanted), 2),
                    BLOCK_C=max(triton.next_power_of_2(triton.cdiv(f, wanted)), 2), PREFETCH=prefetch_lines)
        compiled = _w4a8_mlp_kernel.warmup(*args, **full, PHASE=0, num_warps=num_warps, num_stages=1,
                                           grid=(1,))
        resident = cooperative_programs(compiled, num_warps, x.device.index or 0, cfg["PPS"])
        programs = min(wanted, resident)
        if programs < 1:
            raise RuntimeError("w4a8_mlp: the fused kernel does not fit one program per SM")
    full = dict(flags, BLOCK_P=max(triton.next_power_of_2(programs), 2),
                BLOCK_C=max(triton.next_power_of_2(triton.cdiv(f, programs)), 2), PREFETCH=prefetch_lines)
    launch = _LAUNCH[key] = _Launch(programs, full, num_warps)
    return launch


@functools.cache
def _prefetch_default() -> int:
    import os

    return int(os.environ.get("LOWBIT_MLP_PREFETCH", "1"))


def w4a8_mlp(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, b13: torch.Tensor | None, group13: int,
             w2: torch.Tensor, s2: torch.Tensor, b2: torch.Tensor | None, group2: int,
             prefetch: bool | None = None) -> torch.Tensor:
    """w2(silu(gate) * up) for M <= 4 token rows x (M, K) fp16/bf16 of a W4A8 [gate; up] weight w13
    (2F, K/2) packed int4 with scales s13, and a W4A8 down weight w2 (N2, F/2) with scales s2:
    (M, N2) in x's dtype, equal to w4a8_gemv_q(*act_quant_from_amax(*w4a8_gemv_swiglu(x, ...)), w2, ...).
    prefetch: L2-prefetch each program's first down rows before the first barrier (default on;
    LOWBIT_MLP_PREFETCH=0 turns it off)."""
    from lowbit.kernels.w4a8.gemv_dp4a import _stream_operands

    m = x.shape[0]
    n13, n2 = w13.shape[0], w2.shape[0]
    x, words13, s13, b13, g13 = _stream_operands(x, w13, s13, b13, group13, "w4a8_mlp")
    if n13 % 2:
        raise ValueError(f"w4a8_mlp: the [gate; up] weight has {n13} rows, not 2F")
    f = n13 // 2
    if w2.dim() != 2 or w2.dtype != torch.uint8 or w2.shape[1] * 2 != f:
        raise ValueError(f"w4a8_mlp: the down weight must be (N, {f // 2}) uint8 packed int4, got "
                         f"{tuple(w2.shape)} {w2.dtype}")
    reason = gemv_q_unsupported(m, f, group2)
    if reason:
        raise ValueError(f"w4a8_mlp: down projection: {reason}")
    g2 = 0 if group2 >= f else group2
    if g2 and f % g2:
        raise ValueError(f"w4a8_mlp: F={f} is not a multiple of the down group_size={g2}")
    n_groups2 = f // g2 if g2 else 1
    if s2.shape != (n2, n_groups2):
        raise ValueError(f"w4a8_mlp: the down scale must be ({n2}, {n_groups2}), got {tuple(s2.shape)}")
    s2 = s2 if s2.stride(-1) == 1 or n_groups2 == 1 else s2.contiguous()
    words2 = w2.contiguous().view(torch.int32)
    out = torch.empty((m, n2), dtype=x.dtype, device=x.device)
    if m == 0 or n2 == 0:
        return out
    k = x.shape[1]
    cfg = stream_config(m, n13, k)
    qcfg = gemv_q_config(m, n2, f, g2)
    import os
    if os.environ.get("MLP_Q"):
        bn, bw = os.environ["MLP_Q"].split(",")
        qcfg = dict(qcfg, BLOCK_N=int(bn), BLOCK_W=int(bw))
    if g2 and (qcfg["BLOCK_W"] * 8) % g2:
        raise ValueError(f"w4a8_mlp: down K chunks of {qcfg['BLOCK_W']} words do not hold whole groups of {g2}")
    h = torch.empty((m, f), dtype=x.dtype, device=x.device)
    q, sa = empty_quantized(m, f, x.device)
    kw2 = f // 8
    flags = dict(GROUP13=g13, GROUP2=g2, HAS_B13=b13 is not None, HAS_B2=b2 is not None,
                 USE_ASM=not interpreter_enabled(), BLOCK_M=triton.next_power_of_2(m),
                 K_PAD=max(triton.next_power_of_2(k), 32), BLOCK_N=cfg["BLOCK_N"], PPS=cfg["PPS"],
                 DEPTH=cfg["DEPTH"], BLOCK_N2=qcfg["BLOCK_N"], BLOCK_W2=qcfg["BLOCK_W"])
    use_prefetch = _prefetch_default() != 0 if prefetch is None else prefetch
    lines = triton.next_power_of_2(triton.cdiv(kw2, 32)) if use_prefetch else 0
    key = (x.device, x.dtype, m, n13, k, f, n2, tuple(sorted(flags.items())), lines, os.environ.get("MLP_STOP"))
    sync = sync_buffer(x.device)
    amax_like = torch.empty(1, dtype=torch.float32, device=x.device)

    def args(amax: torch.Tensor) -> tuple:
        return (x, words13, s13, b13 if b13 is not None else s13, h, amax, q, q.view(torch.int32), sa, words2,
                s2, b2 if b2 is not None else s2, out, sync,
                m, n13, k, k // 32, f, kw2, kw2 // 4, n2, x.stride(0), words13.stride(0), s13.stride(0),
                h.stride(0), q.stride(0), words2.stride(0), s2.stride(0), out.stride(0))

    launch = _resolve(args(amax_like), key, x, n13, f, flags, cfg, lines)
    amax = torch.empty((m, launch.programs), dtype=torch.float32, device=x.device)
    grid = (launch.programs,)
    if interpreter_enabled() or not x.is_cuda:
        for phase in (1, 2, 3):
            _w4a8_mlp_kernel[grid](*args(amax), **launch.flags, PHASE=phase, num_warps=launch.num_warps,
                                   num_stages=1)
    else:
        _w4a8_mlp_kernel[grid](*args(amax), **launch.flags, PHASE=0, num_warps=launch.num_warps, num_stages=1,
                               launch_cooperative_grid=True, STOP=int(os.environ.get("MLP_STOP", "9")))
    return out
