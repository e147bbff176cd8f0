"""`lowbit quantize MODEL_DIR --format FMT --out DIR`: quantize any local Hugging Face model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """examples:
  lowbit quantize ./Llama-3.2-1B --format w4a8 --out ./Llama-3.2-1B-w4a8
  lowbit quantize ./my-bert --format int8dq --out ./my-bert-int8dq --json
  lowbit quantize ./model --format int4wo --group-size 64 --skip '*.pooler.*' --out ./model-int4

formats: int8wo int8dq int4wo w4a8 fp8wo fp8dq
load the result with: lowbit.integrations.hf.load_quantized_hf(OUT)
(int4 formats keep the output head in high precision unless --quantize-lm-head)"""

INT4_FORMATS = ("int4wo", "w4a8")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a local Hugging Face model directory",
        description="Quantize every supported nn.Linear of a local Hugging Face model (causal LM or "
        "encoder) and write a directory that load_quantized_hf reads back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local HF model directory (config.json + weights)")
    p.add_argument("--format", required=True, help="int8wo, int8dq, int4wo, w4a8, fp8wo or fp8dq")
    p.add_argument(
        "--group-size", type=int, default=None, help="int4 formats only: 32, 64, 128 (default) or 256"
    )
    p.add_argument("--scale-search", default=None, help="int4 formats only: mse (default) or minmax")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--kind", default="auto", help="auto (from config.json), causal_lm or encoder")
    p.add_argument(
        "--dtype",
        default="auto",
        help="dtype to load and quantize in: auto (as stored), float32, bfloat16, float16",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep layers whose name matches this fnmatch pattern in high precision (repeatable)",
    )
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="also quantize the output head (kept in high precision for int4 formats or when tied)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from lowbit.formats.configs import config_from_short_name

    kwargs: dict = {}
    for flag, value in (("--group-size", args.group_size), ("--scale-search", args.scale_search)):
        if value is None:
            continue
        if args.format not in INT4_FORMATS:
            raise ValueError(f"{flag} applies to {list(INT4_FORMATS)} only, not --format {args.format}")
        kwargs[flag.removeprefix("--").replace("-", "_")] = value
    return config_from_short_name(args.format, **kwargs)


def run(args: argparse.Namespace) -> int:
    config = _config(args)  # bad format / group size fail before any loading
    src = Path(args.model_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"model directory {args.model_dir!r} does not exist")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"{args.model_dir!r} has no config.json (expected a Hugging Face model directory)"
        )
    out = Path(args.out)
    if out.exists() and os.path.samefile(out, src):
        raise ValueError(
            "--out must differ from MODEL_DIR (the quantized weights would overwrite the originals)"
        )

    from lowbit.integrations.hf import (
        load_hf_model,
        load_tokenizer,
        model_bytes,
        quantize_hf_model,
        save_quantized_hf,
    )

    progress = not args.no_progress and not args.json
    log = (lambda msg: print(f"lowbit quantize: {msg}", file=sys.stderr, flush=True)) if progress else None
    if log:
        log(f"loading {src}")
    model = load_hf_model(src, kind=args.kind, dtype=None if args.dtype == "auto" else args.dtype)
    tokenizer = load_tokenizer(src)
    before = model_bytes(model)
    summary = quantize_hf_model(
        model,
        config,
        skip=args.skip,
        quantize_lm_head=True if args.quantize_lm_head else None,
        progress=progress,
    )
    save_quantized_hf(model, out, tokenizer=tokenizer)
    after = model_bytes(model)
    if args.json:
        print(
            json.dumps(
                {
                    **summary.to_dict(),
                    "model_dir": str(src),
                    "out": str(out),
                    "architecture": type(model).__name__,
                    "model_bytes_before": before,
                    "model_bytes_after": after,
                },
                indent=1,
            )
        )
    else:
        print(summary.format_text())
        print(
            f"model {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB; wrote {out} "
            "(load with lowbit.integrations.hf.load_quantized_hf)"
        )
    return 0
