"""Grid-wide barriers for persistent kernels launched cooperatively (every program resident).

A decode step at batch 1 is a chain of short dependent kernels; each boundary costs a launch, a
ramp-up (the next kernel's first weight bytes are one HBM round trip away) and a drain. A
persistent kernel that runs two such kernels as phases separated by a grid barrier pays neither:
its programs issue the next phase's weight loads (or L2 prefetches) before they wait.

`grid_barrier` is a counter + generation barrier on two int32 words (`sync_buffer`): each program
reads the generation, arrives on the counter (acq_rel, GPU scope); the last to arrive puts the
counter back to zero and bumps the generation (release); the others spin until the generation
moves (acquire). The words are left ready for the next barrier and the next launch, so one buffer
per device and stream serves every launch on that stream, CUDA-graph replays included.

It needs every program of the grid resident at once: launch with `launch_cooperative_grid=True`
on at most `cooperative_programs(...)` programs. Under TRITON_INTERPRET the programs run one after
another and a barrier would never open: the kernels then run each phase as its own launch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_SYNC: dict[tuple[int, int], torch.Tensor] = {}


def sync_buffer(device: torch.device) -> torch.Tensor:
    """The zeroed (counter, generation) int32 pair of the current stream on `device`."""
    idx = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda"
                                                          else -1)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (idx, stream)
    buf = _SYNC.get(key)
    if buf is None:
        buf = _SYNC[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return buf


@triton.jit
def _load_acquire(ptr):
    """One int32 loaded with acquire semantics at GPU scope (no read-modify-write: many programs
    polling one word do not queue behind each other's atomics)."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def grid_barrier(sync_ptr):
    """Every program of the grid waits here until all have arrived; stores before it are visible
    to loads after it in every program (loads of data other programs wrote should bypass L1:
    cache_modifier=".cg")."""
    tl.debug_barrier()  # this program's threads have stored
    gen = _load_acquire(sync_ptr + 1)
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        while _load_acquire(sync_ptr + 1) == gen:
            pass
    tl.debug_barrier()


@functools.cache
def _device_limits(index: int) -> tuple[int, int, int]:
    props = torch.cuda.get_device_properties(index)
    return (props.multi_processor_count, getattr(props, "regs_per_multiprocessor", 65536),
            getattr(props, "shared_memory_per_multiprocessor", 232448))


def cooperative_programs(compiled, num_warps: int, index: int, wanted_per_sm: int) -> int:
    """How many programs of a compiled Triton kernel can be resident at once on device `index`,
    at most wanted_per_sm per SM: registers (allocated per warp in units of 256), shared memory
    and the 64-warp / 32-block limits of sm_80+."""
    sms, regs, smem = _device_limits(index)
    compiled._init_handles()  # loads the binary: n_regs is known from then on
    per_warp = triton.cdiv(max(compiled.n_regs, 1) * 32, 256) * 256
    by_regs = regs // (per_warp * num_warps)
    by_smem = smem // max(compiled.metadata.shared, 1) if compiled.metadata.shared else 32
    by_warps = 64 // num_warps
    return sms * max(0, min(wanted_per_sm, by_regs, by_smem, by_warps, 32))
