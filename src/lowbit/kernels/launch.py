"""Triton launches with less host time: the compiled kernel is looked up once per specialization.

`fn[grid](*args, **kw)` binds the arguments, computes Triton's specialization key and looks the
compiled kernel up on every call: ~25-30 us of host time on the H100 machine's CPU
(results/probe_eager_overhead_h100.json), more than a decode GEMV takes on the GPU. In eager
decode every launch pays it. `launch(fn, grid, *args, **kw)` keeps the compiled kernel in a dict
keyed by what Triton specializes on (per tensor: dtype, 16-byte alignment and device; per int:
== 1, divisible by 16, fits int32 / int64; constexprs, bools, None and launch options by value) and calls it
directly. The key is at least as fine as Triton's, so a cached kernel is always the one
`fn[grid]` would run. The first call of each key goes through `fn[grid]` (compiling if needed).

The re-launch goes through the compiled kernel's own runner (`compiled[grid](*args)`), which
calls Triton's launch hooks (profilers) as `fn[grid]` does. Plain `fn[grid]` is used instead
under the interpreter, for autotuned kernels, for callable grids, and with LOWBIT_FAST_LAUNCH=0.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lowbit.kernels import interpreter_enabled

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl")
_CACHE: dict[tuple, tuple[Any, tuple]] = {}  # key -> (compiled kernel's runner, constexpr tail)
_CONSTEXPR_POS: dict[Any, frozenset[int]] = {}


def _spec(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0, v.device.index)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return (v == 1, v % 16 == 0, -2**31 <= v < 2**31, v < 2**63)
    if isinstance(v, float):
        return float
    return ("?", v)  # anything else: by value (must be hashable)


def _constexpr_positions(fn: Any) -> frozenset[int]:
    """Positions of fn's constexpr parameters (a constexpr passed by position keys by value)."""
    pos = _CONSTEXPR_POS.get(fn)
    if pos is None:
        pos = _CONSTEXPR_POS[fn] = frozenset(i for i, p in enumerate(fn.params) if p.is_constexpr)
    return pos


def fast_launch_enabled() -> bool:
    return not interpreter_enabled() and os.environ.get("LOWBIT_FAST_LAUNCH", "1") != "0"


def launch(fn: Any, grid: tuple, *args: Any, **kw: Any) -> None:
    """Same effect as fn[grid](*args, **kw) for a @triton.jit function (constexprs by keyword)."""
    names = getattr(fn, "arg_names", None)
    if (type(fn).__name__ != "JITFunction" or names is None or not isinstance(grid, tuple)
            or not fast_launch_enabled()):
        fn[grid](*args, **kw)
        return
    try:
        const_pos = _constexpr_positions(fn)
        key = (fn, grid, tuple(("c", a) if i in const_pos else _spec(a) for i, a in enumerate(args)),
               tuple(sorted(kw.items())))
        hit = _CACHE.get(key)
    except TypeError:  # an unhashable keyword value
        fn[grid](*args, **kw)
        return
    if hit is None:
        kernel = fn[grid](*args, **kw)
        consts = {k: v for k, v in kw.items() if k not in _OPTIONS}
        if kernel is None or not hasattr(kernel, "__getitem__") or len(args) + len(consts) != len(names) \
                or any(n not in consts for n in names[len(args):]):
            return  # launched; not cached (an unexpected signature or Triton API)
        grid3 = tuple(grid) + (1,) * (3 - len(grid))  # the compiled kernel's runner reads 3 dims
        _CACHE[key] = (kernel[grid3], tuple(consts[n] for n in names[len(args):]))
        return
    runner, tail = hit
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    stream = torch.cuda.current_stream(dev).cuda_stream
    runner(*args, *tail, stream=stream)


def cache_clear() -> None:
    _CACHE.clear()
