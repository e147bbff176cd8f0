"""`lowbit demo`: every format on the embedded MiniLM, one table, JSON + PNG."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """examples:
  lowbit demo                                  all formats on the best device (cuda > mps > cpu)
  lowbit demo --formats int8dq,w4a8,w4a8:minmax --out /tmp/demo
  lowbit demo --device cpu --json > demo.json

formats: int8wo int8dq int4wo w4a8 fp8wo fp8dq; int4wo/w4a8 take ':minmax' or ':mse' (default)
writes OUT/demo.json and OUT/demo.png (size vs accuracy, colour = latency)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="quantize the embedded MiniLM with every format and compare",
        description="Quantize the embedded MiniLM sentence encoder with each format and report size, "
        "latency and cosine similarity of sentence embeddings vs the fp32 model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--formats", default=None, help="comma-separated subset (default: all, see below)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="activation/model dtype of the quantized copies: auto (float16 on CUDA, else "
        "float32), float32, float16, bfloat16",
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs per format (median reported)")
    p.add_argument("--out", default="lowbit_demo_out", help="output folder (default: lowbit_demo_out)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lowbit.demo import format_table, run_demo, write_outputs

    result = run_demo(
        args.formats,
        device=args.device,
        dtype=args.dtype,
        runs=args.runs,
        log=lambda msg: print(f"lowbit demo: {msg}", file=sys.stderr, flush=True),
    )
    jpath, ppath = write_outputs(result, args.out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
        print(f"wrote {jpath} and {ppath} (total {result['wall_s']:.1f} s)")
    return 0
