"""`lowbit eval`: sliding-window perplexity of a (quantized) Llama model on a text file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit.commands.generate import add_model_args, load_options, write_json

EXAMPLE = "example: lowbit eval --model ./Llama-3.1-8B --text wiki.test.txt --quant w4a8 --seq-len 2048"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="sliding-window perplexity on a text file", description=__doc__, epilog=EXAMPLE
    )
    add_model_args(p)
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    p.add_argument("--seq-len", type=int, default=2048, help="window length in tokens")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts (default: --seq-len, i.e. disjoint windows)",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lowbit.llm.harness import load
    from lowbit.llm.metrics import model_size, versions
    from lowbit.llm.perplexity import perplexity
    from lowbit.llm.tokenizer import encode_checked

    if not args.text.is_file():
        raise FileNotFoundError(f"--text {args.text} does not exist")
    text = args.text.read_text(encoding="utf-8")
    loaded = load(load_options(args))
    ids = encode_checked(loaded.tokenizer, text, loaded.model.args.vocab_size)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    res = perplexity(
        loaded.model,
        torch.tensor(ids, dtype=torch.long, device=loaded.device),
        seq_len=args.seq_len,
        stride=args.stride,
    )
    size = model_size(loaded.model)
    row = {
        "model": loaded.model.args.name,
        "source": loaded.source,
        "quant": loaded.quantizer.label,
        "quant_config": loaded.quantizer.describe(),
        "text": str(args.text),
        "tokens": len(ids),
        "tokenizer": loaded.tokenizer.name,
        "seq_len": args.seq_len,
        "stride": args.stride or args.seq_len,
        "perplexity": res.perplexity,
        "nll_sum": res.nll_sum,
        "scored_tokens": res.scored_tokens,
        "windows": res.windows,
        "eval_s": res.seconds,
        "model_size_gb": size.total_bytes / 1e9,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "versions": versions(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(
        f"{row['model']} {row['quant']} {row['dtype']}: perplexity {res.perplexity:.4f} over "
        f"{res.scored_tokens} tokens ({res.windows} windows of {args.seq_len}, stride "
        f"{row['stride']}) in {res.seconds:.1f} s"
    )
    write_json(args.json_out, row)
    return 0
