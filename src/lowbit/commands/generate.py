"""`lowbit generate`: time prefill and decode of a (quantized) Llama model.

Prints one line per run and, with --json-out, writes the full result row(s) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from lowbit.llm.loading import LOWBIT_FORMATS, QUANT_CHOICES

EXAMPLE = (
    "example: lowbit generate --model llama-3-8b --random-weights --quant w4a8 --compile "
    "--prompt-len 128 --max-new-tokens 128 --json-out run.json"
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `generate` and `eval`: which model, which format, where."""
    p.add_argument(
        "--model",
        required=True,
        help="a Hugging Face Llama checkpoint directory, or a shape preset: llama-2-7b, "
        "llama-2-13b, llama-3-8b, llama-3.1-8b, llama-3-70b, tiny (needs --random-weights)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="random N(0, 0.02) weights at the model's real shapes (no download)",
    )
    p.add_argument(
        "--quant",
        default="none",
        choices=QUANT_CHOICES,
        help="weight format; torch-int4 / torchao-int4 are baselines (default: none)",
    )
    p.add_argument(
        "--decode-quant",
        default=None,
        choices=("none", *LOWBIT_FORMATS),
        help="a second format used only for decode (stores two weights per linear); "
        "--quant is then the prefill format",
    )
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128; 0 = per row)")
    p.add_argument(
        "--decode-threshold",
        type=int,
        default=None,
        help="dynamic formats: token counts below it use the weight-only path",
    )
    p.add_argument("--keep-lm-head", action="store_true", help="leave the output layer unquantized")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        help="activation/high-precision dtype: auto (bfloat16 on CUDA, float32 on CPU), "
        "bfloat16, float16, float32",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, prompts and sampling")
    p.add_argument("--json-out", type=Path, default=None, help="write the result as JSON here")


def load_options(args: argparse.Namespace) -> Any:
    from lowbit.llm.harness import LoadOptions

    return LoadOptions(
        model=args.model,
        random_weights=args.random_weights,
        quant=args.quant,
        decode_quant=args.decode_quant,
        group_size=args.group_size,
        decode_threshold=args.decode_threshold,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        quantize_output=not args.keep_lm_head,
    )


def write_json(path: Path | None, payload: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="time prefill (TTFT) and decode of a Llama model",
        description=__doc__,
        epilog=EXAMPLE,
    )
    add_model_args(p)
    p.add_argument("--prompt", default=None, help="prompt text (default: a short built-in sentence)")
    p.add_argument(
        "--prompt-len",
        type=int,
        default=None,
        help="prompt tokens: the prompt text repeated/cut to N tokens, or N random ids "
        "when --prompt is not given",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="KV cache length (default: prompt length + max new tokens)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)"
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the eager decode step (and short prefills) in CUDA graphs, without "
        "torch.compile: no compile time, no per-kernel launch cost (GPU; not with --compile). "
        "Default: on for a single-GPU run without --compile; --no-cuda-graph runs plain eager",
    )
    p.add_argument(
        "--compile-mode",
        default="auto",
        help="torch.compile mode: auto (reduce-overhead on CUDA, default on CPU), "
        "default, reduce-overhead, max-autotune, ...",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--runs", type=int, default=1, help="repeat the timed generation N times")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallel over N GPUs of one host: launch with "
        "`torchrun --nproc-per-node N -m lowbit generate --tp N ...` (rank 0 prints and writes JSON)",
    )
    p.set_defaults(func=run)


def default_cuda_graph(flag: bool | None, device: Any, compile: bool, tp: int) -> bool:
    """--cuda-graph as given, else on for a CUDA device without --compile and without --tp (NCCL
    inside captured graphs is not measured yet; docs/distributed.md): eager decode there is bound
    by the host's per-kernel launch cost (Llama-2-7B W4A8 batch 1: about 20 tok/s eager against
    about 400 replayed, docs/llm.md)."""
    import torch

    if flag is not None:
        return flag
    return torch.device(device).type == "cuda" and not compile and tp == 1


def run(args: argparse.Namespace) -> int:
    from lowbit.distributed.launch import is_main_rank
    from lowbit.llm.harness import RunOptions, format_row, load
    from lowbit.llm.harness import run as run_once

    if args.runs < 1:
        raise ValueError(f"--runs {args.runs} must be >= 1")
    if args.cuda_graph and args.compile:
        raise ValueError("--cuda-graph captures the eager decode step; --compile already replays "
                         "CUDA graphs: choose one")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp == 1 and world > 1:
        raise ValueError(f"torchrun started {world} processes but --tp is 1: pass --tp {world} "
                         "(or run one process)")
    options = load_options(args)
    options.tp = args.tp
    loaded = load(options)
    cuda_graph = default_cuda_graph(args.cuda_graph, loaded.model.device, args.compile, args.tp)
    main = is_main_rank()  # --tp: rank 0 prints and writes the JSON
    opts = RunOptions(
        batch_size=args.batch_size,
        prompt_len=args.prompt_len,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        max_seq_len=args.max_seq_len,
        compile=args.compile,
        compile_mode=args.compile_mode,
        cuda_graph=cuda_graph,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    rows = []
    try:
        for _ in range(args.runs):
            row = run_once(loaded, opts)
            rows.append(row)
            if main:
                print(format_row(row))
    finally:
        loaded.close()
    if main:
        write_json(args.json_out, rows[0] if len(rows) == 1 else rows)
    return 0
