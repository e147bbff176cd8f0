"""`lowbit bench`: the kernel benchmark for this machine (GPU kernels, or CPU reference timings)."""

from __future__ import annotations

import argparse
import json

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time one linear layer: high precision vs lowbit formats on this machine",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: lowbit bench --formats w4a8,int4wo --m 1 16 2048",
    )
    p.add_argument("--model", default="Llama-2-7B",
                   help="shape set on a GPU (Llama-2-7B, Llama-3-8B, ...)")
    p.add_argument("--m", type=int, nargs="*",
                   help="token counts (default: GPU 1 16 2048 8192; CPU 1 16 128)")
    p.add_argument("--formats", default=None, help="comma list of format short names")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.bench import format_table, run_bench
    from lowbit.formats.configs import CONFIGS_BY_SHORT_NAME
    from lowbit.testing.shapes import MODEL_SHAPES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    default = "w4a8,int4wo,int8dq,fp8dq" if device.startswith("cuda") else "w4a8,int4wo,int8dq,int8wo"
    formats = [f.strip() for f in (args.formats or default).split(",") if f.strip()]
    unknown = [f for f in formats if f not in CONFIGS_BY_SHORT_NAME]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; allowed: {sorted(CONFIGS_BY_SHORT_NAME)}")
    if device.startswith("cuda") and args.model not in MODEL_SHAPES:
        raise ValueError(f"--model {args.model!r}; allowed: {sorted(MODEL_SHAPES)}")
    if args.m is not None and any(m <= 0 for m in args.m):
        raise ValueError(f"--m values must be positive, got {args.m}")
    result = run_bench(args.model, args.m, formats, device)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
