"""`lowbit bench`: side-by-side timings of one linear layer, high precision vs lowbit formats.

On a CUDA GPU: Llama shapes, bf16, CUDA-graph replays timed with triton's do_bench (L2 flushed),
the kernels AUTO picks. On CPU: smaller shapes, fp32, the reference path, timed with
torch.utils.benchmark. benchmarks/bench_linear.py is the full study with peer columns.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats.configs import config_from_short_name
from lowbit.testing.shapes import MODEL_SHAPES


def git_sha(repo: str | None = None) -> str | None:
    """$LOWBIT_GIT_SHA when set (GPU runs copy the tree; a .git there may be stale), else the checkout's."""
    if os.environ.get("LOWBIT_GIT_SHA"):
        return os.environ["LOWBIT_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=repo or os.path.dirname(os.path.abspath(__file__)))
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def cpu_name() -> str:
    """The CPU model and core count (from /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(t_start: float, device: str) -> dict[str, Any]:
    """The provenance block of a CPU benchmark result: device, threads, versions, git sha, seconds
    since `t_start` (time.perf_counter)."""
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "git_sha": git_sha(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }


CPU_SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096)]
GPU_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def cuda_graphed(fn):
    """fn run once eagerly (compiles, autotunes), then captured: returns the graph's replay."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_cuda_graphed(fn) -> float:
    """Median microseconds of fn as a CUDA-graph replay (no launch overhead in the timing)."""
    import triton

    return triton.testing.do_bench(cuda_graphed(fn), warmup=10, rep=50, return_mode="median") * 1e3


def _time_cpu(fn) -> float:
    from torch.utils import benchmark

    t = benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2)
    return t.median * 1e6


def run_bench(model: str, ms: list[int] | None, formats: list[str], device: str) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        shapes = [(f"{model}:{name}", *MODEL_SHAPES[model][name]) for name in GPU_LAYERS]
    else:
        shapes = [(f"cpu:{n}x{k}", n, k) for n, k in CPU_SHAPES]
    ms = ms or ([1, 16, 2048, 8192] if cuda else [1, 16, 128])
    timer = time_cuda_graphed if cuda else _time_cpu
    rows = []
    with torch.inference_mode():
        for label, n, k in shapes:
            w = (torch.randn(n, k, device=device) * 0.02).to(dtype)
            weights = {"hp": w}
            for f in formats:
                weights[f] = config_from_short_name(f).quantize_weight(w)
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)
                row: dict[str, Any] = {"shape": label, "N": n, "K": k, "M": m}
                for name, wt in weights.items():
                    try:
                        row[name] = round(timer(lambda wt=wt, x=x: F.linear(x, wt)), 2)
                    except Exception as e:  # a format this device cannot run: say why, keep going
                        row[name] = f"error: {type(e).__name__}: {e}"[:120]
                rows.append(row)
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "timing": "cuda-graph do_bench median"
            if cuda else "torch.utils.benchmark median", "formats": formats, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    fmts = result["formats"]
    head = f"{'shape':<28} {'M':>5} {'hp us':>9} " + " ".join(f"{f + ' us (x)':>18}" for f in fmts)
    lines = [f"{result['device']}  torch {result['torch']}  {result['dtype']}  ({result['timing']})", head]
    for r in result["rows"]:
        cells = []
        for f in fmts:
            v = r[f]
            hp = r["hp"]
            if isinstance(v, (int, float)) and isinstance(hp, (int, float)):
                cells.append(f"{v:>10.1f} ({hp / v:4.2f}x)")
            else:
                cells.append(f"{'error':>18}")
        hp_cell = f"{r['hp']:>9.1f}" if isinstance(r["hp"], (int, float)) else f"{'error':>9}"
        lines.append(f"{r['shape']:<28} {r['M']:>5} {hp_cell} " + " ".join(cells))
    return "\n".join(lines)
