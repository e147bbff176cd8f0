"""W4A8 linear on the CUTLASS sm_90a kernel (src/lowbit/csrc/cutlass_w4a8/w4a8_gemm.cu).

Same stored weight as the Triton path: packed uint8 (N, K // 2), low nibble = even k, which is
byte for byte a row-major (N, K) cutlass::int4b_t tensor, so no repack. Activations go through
the same per-token int8 quantization (act_quant); the kernel converts int4 -> int8 in registers,
runs int8 tensor cores with int32 accumulation and applies weight scale, activation scale and
bias in its epilogue.

Per-row weight scales only (group_size == K): the CUTLASS mixed-input collective applies
group scales to the converted operand before the MMA, which cannot work when that operand is
int8; see the .cu header. Eager calls cache the float32 copy of the scale the epilogue reads per
scale tensor (refreshed when the tensor is modified in place); compiled graphs convert it per call.

The same extension holds a plain-CUDA kernel for decode batches (1..32 tokens, csrc/cutlass_w4a8/
w4a8_mma.cu, `mma_gemm`): mma.sync with the packed weight loaded straight into the B fragment.

AUTO takes the extension only on the (N, K, token range) entries of CUTLASS_AUTO_SHAPES (the
CUTLASS GEMM) and MMA_AUTO_SHAPES (the mma kernel, which wins where both are listed), where the
committed H100 runs measured it faster than the Triton path, and only once the extension is
compiled (cached build, LOWBIT_CUTLASS_LIB, or already loaded): AUTO never starts a compile.
kernel=CUTLASS always runs the CUTLASS GEMM.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

# NOTE: H100, benchmarks/results/cutlass_h100.json (python benchmarks/check_cutlass.py, one run):
# CUTLASS vs the Triton AUTO path, per-row W4A8 incl. activation quantization, at M = 16 / 128 / 2048:
#   22016x4096 1.24x / 2.28x / 1.05x;  12288x4096 1.22x / 2.01x / 1.00x;  4096x11008 1.76x / 1.65x / 0.98x;
#   4096x4096 0.97x / 0.92x / 0.99x.  Triton wins at M=1 (0.50-0.70x) and M=8192 (0.82-0.92x) on all four.
# Llama-3-8B shapes, benchmarks/results/linear_h100.json (bench_linear, w4a8rC vs Triton) at M = 16 / 128:
#   14336x4096 1.38x / 2.20x; 28672x4096 1.34x / 2.53x; 4096x14336 1.13x / 1.88x; 11008x4096 1.26x / 1.83x;
#   6144x4096 1.05x / 1.25x; 1024x4096 0.79x / 0.79x (not listed).
# Entries are (N, K, first token count, end token count): CUTLASS for first <= M < end. M=5..15 runs
# the same 128x32 CUTLASS tile and the same Triton decode kernel as M=16.
# Output heads (Llama-2 32000x4096, Llama-3 128256x4096), from int8 activations at M=16
# (benchmarks/results/tune_decode16q_h100.json, tune_decode16q_rule_h100.json): CUTLASS 43.8 us vs
# Triton 65.0 us, 122.1 us vs 221.1 us. Decode batches only (M <= 32: one 32-token tile).
# Eager AUTO calls on the mma kernel launch it with programmatic dependent launch after an
# act_quant that triggers it (mma_gemm's pdl): the first weight rounds stream in while the
# activations are quantized. Compiled graphs quantize inside Inductor's kernels, which do not
# trigger, and keep plain launches.
# NOTE: H100, M=16, act_quant + kernel, CUDA-graph replays, L2 flushed, one run (results/
# probe_mma_decode_pdl_h100.json, sha ed480a7): with PDL 25.0 vs 28.4 us (4096x11008), 27.8 vs 31.2
# (4096x14336), 16.1 vs 17.5 (4096x4096), 22.9 vs 23.9 (12288x4096); 0.3-3.6 us saved on all ten
# Llama shapes at M=8 and 16.
PDL_EAGER = True

CUTLASS_AUTO_SHAPES: tuple[tuple[int, int, int, int], ...] = tuple(
    (n, k, 5, 2048)
    for n, k in ((22016, 4096), (12288, 4096), (4096, 11008), (14336, 4096), (28672, 4096),
                 (4096, 14336), (11008, 4096), (6144, 4096))
) + ((32000, 4096, 5, 33), (128256, 4096, 5, 33))

# NOTE: H100, benchmarks/results/probe_mma_decode_w16_h100.json (python benchmarks/probe_mma_decode.py
# --no-sweep, one run, sha eb7d861: the launcher's defaults of today, two weight rounds in flight,
# 16-warp CTAs): the mma.sync decode-batch kernel (csrc/cutlass_w4a8/w4a8_mma.cu) incl. act_quant vs
# the best other path, us. The other paths are the CUTLASS GEMM or the Triton decode kernel from
# int8 inputs plus that run's act_quant cost (the mma column minus mma_q), and at M <= 4 the dp4a
# GEMV with its fused quantization (AUTO's time in results/probe_mma_decode_depth2_h100.json, sha
# 65acd97, where those entries were not yet listed):
#   12288x4096 M=4/8/16: 22.2/22.2/22.9 vs 25.5/25.1/25.5;  22016x4096: 35.0/35.5/36.7 vs 38.0/41.3/41.2
#   11008x4096 M=4/8/16: 21.1/21.2/22.0 vs 24.4/24.5/24.4;  14336x4096: 23.9/24.1/24.6 vs 27.7/27.6/27.5
#   6144x4096 M=8/16: 19.1/19.3 vs 21.9/22.0 (M=4: 19.2 vs 18.7, the GEMV)
#   4096x11008 M=2/4/8/16: 26.9/27.1/27.0/27.9 vs 32.9/33.1/33.0/33.2 (4096x14336: 29.5/29.4/30.0/30.8
#   vs 35.9/36.0/36.4/36.3; 28672x4096: 36.9/37.1/37.1/38.7 vs 37.7/44.7/44.2/44.6)
#   4096x4096 M=8/16/32: 17.3/17.3/19.9 vs 17.7/17.5/20.8;  1024x4096: 13.1/12.9/13.8 vs 15.6/15.6/17.4
# It is slower at M=1 everywhere and at M=2 on the other K=4096 layers (the dp4a GEMV), at M=4 on
# 4096x4096, 1024x4096 and 6144x4096, and at M=32 elsewhere (the CUTLASS GEMM), so AUTO takes it only
# on these (N, K, first, end) entries, first <= M < end. M=5..7 run the same kernels as M=8.
# With PDL_EAGER and the dp4a GEMV's M=3 fix (results/probe_mma_decode_pdl_final_h100.json, sha
# 3622cd2, one run), M=3 / 4, us: the kernel after act_quant with PDL (eager) / from int8 inputs (a
# compiled graph, which quantizes in the producer) vs the Triton path AUTO takes without the
# extension: 12288x4096 21.3 / 21.4 and 20.3 / 20.0 vs 26.1 / 26.4; 22016x4096 34.9 / 35.0 and
# 33.0 / 33.2 vs 37.4 / 37.8; 11008x4096 20.5 / 20.8 and 19.3 / 19.5 vs 24.4 / 25.1; 14336x4096
# 22.7 / 23.1 and 21.4 / 21.6 vs 28.4 / 29.1: those start at M=3. Not the smaller ones, even or
# behind with PDL: 6144x4096 18.7 / 18.8 vs 18.6 / 19.0, 4096x4096 15.6 / 15.8 vs 15.8 / 16.4,
# 1024x4096 11.7 / 11.6 vs 10.9 / 11.2. M=2 stays on the GEMV (12288x4096: 21.4 vs 21.1).
MMA_AUTO_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (4096, 11008, 2, 17),
    (4096, 14336, 2, 17),
    (28672, 4096, 2, 17),
    (22016, 4096, 3, 17),
    (12288, 4096, 3, 17),
    (11008, 4096, 3, 17),
    (14336, 4096, 3, 17),
    (6144, 4096, 5, 17),
    (4096, 4096, 5, 33),
    (1024, 4096, 5, 33),
)
# Group-wise weights (group a multiple of 128 dividing K): the mma kernel scales each group's int32
# sum in float32. H100, g128, incl. act_quant, vs AUTO's Triton path (the dp4a GEMV at M <= 4, the
# Triton decode kernel above), us; the Triton decode times are its int8-input time plus that run's
# act_quant cost. M <= 16: results/probe_mma_decode_w16_g128_h100.json (sha eb7d861):
#   4096x11008 M=2/4/8/16: 34.5/34.6/34.5/35.4 vs 50.1 (decode kernel, M=2) / 49.6/49.5/50.0
#   4096x14336 M=2/4/8/16: 36.8/36.6/37.2/38.0 vs 47.2/46.4/46.7/46.4
#   22016x4096 M=8/16: 47.8/48.7 vs 55.7/55.7;  28672x4096: 49.3/50.9 vs 62.8/62.7
#   14336x4096 M=8/16: 30.1/30.7 vs 40.3/40.3;  12288x4096: 29.1/29.4 vs 33.2/32.9
#   11008x4096 M=8/16: 28.4/28.8 vs 32.9/32.9;  6144x4096: 22.4/22.9 vs 25.6/25.5
#   1024x4096 M=8/16: 13.7/14.0 vs 16.0/16.2
#   slower at M = 2..4 on the K=4096 layers (the GEMV) and on 4096x4096 at M = 8/16 (19.1/19.5 vs
#   18.9/19.0).
# M = 32 (two 16-token tiles in both kernels, as for M=17..31; 16 warps at depth 1, the launcher's
# group-wise default from results/probe_mma_decode_depth_g128_h100.json, sha f803d08, checked in
# results/probe_mma_decode_final_g128_h100.json): see that file's "rows".
MMA_AUTO_SHAPES_GROUPED: tuple[tuple[int, int, int, int], ...] = (
    (4096, 11008, 2, 33),
    (4096, 14336, 2, 33),
    (22016, 4096, 5, 33),
    (28672, 4096, 5, 33),
    (14336, 4096, 5, 33),
    (12288, 4096, 5, 33),
    (11008, 4096, 5, 33),
    (6144, 4096, 5, 33),
    (1024, 4096, 5, 33),
    (4096, 4096, 17, 33),
)

_SCALE_F32: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MMA_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def shape_unsupported(n: int, k: int, group_size: int) -> str | None:
    """Why the kernel cannot take this weight (None: it can)."""
    if group_size != k:
        return (
            f"the CUTLASS kernel takes per-row weight scales only (group_size=None), "
            f"got group_size={group_size}"
        )
    if k % 32 or n % 8:
        return f"the CUTLASS kernel needs K % 32 == 0 and N % 8 == 0, got N={n}, K={k}"
    return None


def mma_groups_ok(k: int, group_size: int) -> bool:
    """Scales the mma kernel takes: per row, or groups of a multiple of 128 dividing K."""
    return group_size >= k or (group_size % 128 == 0 and k % group_size == 0)


def unavailable_reason(x: torch.Tensor, n: int, k: int, group_size: int, symmetric: bool,
                       mma: bool = False) -> str | None:
    """None when kernel=CUTLASS can run this W4A8 linear here, else a one-line reason. mma: the
    call would run the extension's mma kernel (AUTO), which also takes group-wise scales."""
    from lowbit.kernels.cutlass import build

    if not symmetric:
        return "the CUTLASS W4A8 kernel takes symmetric weights (zero_point_domain='none')"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUTLASS kernel takes fp16/bf16 activations, got {x.dtype}"
    shape = shape_unsupported(n, k, k if mma and mma_groups_ok(k, group_size) else group_size)
    reason = shape or build.device_blocker(x.device)
    return reason or (None if build.ready() else build.build_blocker())


def _listed(table: tuple[tuple[int, int, int, int], ...], n: int, k: int, tokens: int) -> bool:
    return any(n == sn and k == sk and lo <= tokens < hi for sn, sk, lo, hi in table)


def auto_prefers_mma(n: int, k: int, tokens, group_size: int | None = None) -> bool:
    """True where AUTO's native path runs the mma.sync decode-batch kernel: MMA_AUTO_SHAPES for
    per-row weights (group_size None or >= K), MMA_AUTO_SHAPES_GROUPED for group-wise ones."""
    if group_size is None or group_size >= k:
        return _listed(MMA_AUTO_SHAPES, n, k, tokens)
    return mma_groups_ok(k, group_size) and _listed(MMA_AUTO_SHAPES_GROUPED, n, k, tokens)


def auto_prefers_cutlass(n: int, k: int, tokens, group_size: int | None = None) -> bool:
    """True where a measured table prefers the native extension (the CUTLASS GEMM or the mma
    decode-batch kernel) and the extension needs no compile."""
    from lowbit.kernels.cutlass import build

    per_row = group_size is None or group_size >= k
    cutlass = per_row and _listed(CUTLASS_AUTO_SHAPES, n, k, tokens)
    if not (cutlass or auto_prefers_mma(n, k, tokens, group_size)):
        return False
    return build.compiled()


def _scale_f32(scale: torch.Tensor) -> torch.Tensor:
    hit = _SCALE_F32.get(scale)
    if hit is not None and hit[0] == scale._version:
        return hit[1]
    f32 = scale.reshape(-1).to(torch.float32).contiguous()
    _SCALE_F32[scale] = (scale._version, f32)
    return f32


def _quantize(x2: torch.Tensor, trigger_dependents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from lowbit.kernels import _triton_installed

    if _triton_installed():
        from lowbit.kernels.w4a8.act_quant import act_quant

        return act_quant(x2, trigger_dependents=trigger_dependents)
    from lowbit.kernels.w4a8.reference import act_quant_ref

    return act_quant_ref(x2)


def _native_args(qa, sa, packed, sw, bias, out_dtype) -> tuple:
    """The extension's operand layout: contiguous int8 / uint8, flat scales (sw already in the dtype
    the kernel reads), bias in out_dtype."""
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    return (qa.contiguous(), sa.reshape(-1).contiguous(), packed.contiguous(), sw.reshape(-1).contiguous(),
            None if bias is None else bias.contiguous(), out_dtype)


def gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8 (M, K) x packed int4 (N, K//2) -> (M, N): (acc * scale) * sa (+ bias), one rounding."""
    from lowbit.kernels.cutlass.build import load

    return load().w4a8_gemm(*_native_args(qa, sa, packed, _scale_f32(scale), bias, out_dtype))


def mma_gemm(
    qa: torch.Tensor,
    sa: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    group_size: int = 0,
    warps_n: int = 0,
    split: int = 0,
    depth: int = 0,
    pdl: bool = False,
) -> torch.Tensor:
    """Decode batches (1..32 tokens) on the mma.sync kernel (csrc/cutlass_w4a8/w4a8_mma.cu); same
    arguments as gemm, plus group_size: 0 or K = per-row scale (N, 1) (same numerics as gemm), else
    a multiple of 128 dividing K with scale (N, K // group_size). warps_n (4, 8 or 16), split (1..8) and
    depth (1..3 rounds of weight loads in flight): 0 = the launcher's rule. pdl=True launches with
    programmatic dependent launch: the kernel may start while the previous kernel on the stream
    (act_quant(trigger_dependents=True), which produced qa and sa) still runs, and waits for it
    before reading them. Always correct; it only overlaps when that kernel triggers."""
    from lowbit.kernels.cutlass.build import load

    # The kernel reads bf16 / fp16 / fp32 weight scales as stored (widening is exact): no converted
    # copy to cache, which in a CUDA graph's memory pool would outlive the graph's outputs.
    sw = scale if scale.dtype in _MMA_SCALE_DTYPES else scale.to(torch.float32)
    args = _native_args(qa, sa, packed, sw, bias, out_dtype)
    return load().w4a8_mma(*args, group_size, warps_n, split, depth, pdl)


def _linear_impl(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    qa, sa = _quantize(x)
    return gemm(qa, sa, packed, scale, bias, x.dtype)


def _mma_default(
    qa: torch.Tensor,
    sa: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    group_size: int,
) -> torch.Tensor:
    return mma_gemm(qa, sa, packed, scale, bias, out_dtype, group_size)


def _gemm_in_graph(
    qa: torch.Tensor,
    sa: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """gemm for compiled graphs: the float32 scale is converted per call, never cached. A copy cached
    while CUDA graphs warm up or record would live in their memory pool untracked (cudagraph trees
    refuse that), and a graph holding an eagerly cached copy would read stale or freed memory after
    an in-place scale update."""
    from lowbit.kernels.cutlass.build import load

    return load().w4a8_gemm(*_native_args(qa, sa, packed, scale.to(torch.float32), bias, out_dtype))


w4a8_cutlass_op = torch.library.custom_op("lowbit::w4a8_cutlass_gemm", mutates_args=())(_gemm_in_graph)
w4a8_mma_op = torch.library.custom_op("lowbit::w4a8_mma", mutates_args=())(_mma_default)


@w4a8_cutlass_op.register_fake
def _(qa, sa, packed, scale, bias, out_dtype):
    return qa.new_empty((qa.shape[0], packed.shape[0]), dtype=out_dtype)


@w4a8_mma_op.register_fake
def _(qa, sa, packed, scale, bias, out_dtype, group_size):
    return qa.new_empty((qa.shape[0], packed.shape[0]), dtype=out_dtype)


def _takes_mma(w, tokens) -> bool:
    """AUTO weights on a MMA_AUTO_SHAPES entry; an explicit kernel=CUTLASS keeps the CUTLASS GEMM.
    A symbolic token count is compared like an int (guards, as Int4Tensor's table lookup does), so
    the graph runs the kernel that lookup chose."""
    from lowbit.core.kernel_choice import KernelChoice

    if w.kernel is not KernelChoice.AUTO:
        return False
    return bool(auto_prefers_mma(w.shape[0], w.shape[1], tokens, w.group_size))


def w4a8_linear(x2: torch.Tensor, w, bias: torch.Tensor | None) -> torch.Tensor:
    """Entry point used by Int4Tensor: x2 (M, K) fp16/bf16 -> (M, N). Inference only."""
    from lowbit.kernels import dispatches_op

    mma = _takes_mma(w, x2.shape[0])
    if dispatches_op(x2, w.qdata, grad=False):
        # The graph quantizes the activations in plain ops, which Inductor fuses into their producer.
        from lowbit.kernels.w4a8.act_quant import act_quant_traceable

        qa, sa = act_quant_traceable(x2)
        if mma:
            return w4a8_mma_op(qa, sa, w.qdata, w.scale, bias, x2.dtype, w.group_size)
        return w4a8_cutlass_op(qa, sa, w.qdata, w.scale, bias, x2.dtype)
    # NOTE: eager calls skip the custom-op dispatcher (tens of microseconds per call).
    if mma:
        # The kernel starts streaming its weights while act_quant still runs (PDL_EAGER).
        qa, sa = _quantize(x2, trigger_dependents=PDL_EAGER)
        return mma_gemm(qa, sa, w.qdata, w.scale, bias, x2.dtype, w.group_size, pdl=PDL_EAGER)
    return _linear_impl(x2, w.qdata, w.scale, bias)
