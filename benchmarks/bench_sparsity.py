"""2:4 semi-structured sparsity: accuracy on a real model (CPU) and kernel speed (GPU).

--accuracy (~5 minutes on 2 idle CPU cores): MiniLM (all-MiniLM-L6-v2) embedding distillation. The
  fp32 model is the teacher; students have their encoder linears as dense int8dq, 2:4 fp32, 2:4 +
  int8dq (post-training magnitude pruning) and 2:4 + int8dq fine-tuned (fixed masks + QAT int8dq,
  then sparsify_). Metric: held-out mean cosine of mean-pooled embeddings vs the teacher, English
  sentences of `pydoc_data.topics`. Writes benchmarks/results/sparsity_minilm.json.
--speed (CUDA GPU, < 4 minutes on H100; the study is in sparsity_speed.py): x @ W^T at Llama MLP
  shapes, M in 1, 16, 128 (decode, where 2:4 tends to lose) and 2048, 8192 (prefill), side by side
  in one run: dense bf16 (cuBLAS); 2:4 bf16 (cuSPARSELt) with the searched algorithm (what lowbit
  runs), with the default algorithm 0, and with two other operand layouts; dense int8 dynamic
  (per-token quant + torch._int_mm + scales) and 2:4 int8 dynamic (quant + cuSPARSELt, row scale
  fused) likewise; plus lowbit's dense path of the 2:4 weight (what AUTO runs below *_MIN_TOKENS).
  Every path is checked against the reference first. do_bench median, L2 flushed; M <= 128 as
  CUDA-graph replays. Prints the per-format crossover M vs dense and vs the dense path, writes
  benchmarks/results/sparsity_speed.json (--out) and with --table the compact table that
  lowbit.sparsity.speed reads (src/lowbit/data/sparsity_speed_h100.json).

    python benchmarks/bench_sparsity.py --accuracy
    python benchmarks/bench_sparsity.py --speed [--quick] [--out FILE] [--table FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lowbit  # noqa: E402
from lowbit import Int8DynamicActivationInt8WeightConfig, QATConfig, SemiSparseConfig  # noqa: E402
from lowbit.bench import run_metadata  # noqa: E402
from lowbit.sparsity import Int8DynamicActivationSemiSparseInt8WeightConfig as Int8DQ24  # noqa: E402
from lowbit.sparsity import SemiSparseMasks, sparsify_  # noqa: E402
from lowbit.testing.distill import (  # noqa: E402
    MODEL_NOTE,
    data_note,
    distill_train,
    embed_all,
    encoder_linears,
    load_sentences,
    loss_summary,
    model_dir,
    tokenize,
)
from lowbit.testing.distill import mean_cosine as cosine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def write_json(result: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({result['total_seconds']:.0f}s)")
    return 0


# ---------------------------------------------------------------------------------------------
# accuracy (CPU)
# ---------------------------------------------------------------------------------------------


def fine_tune(
    teacher: nn.Module,
    train: list[dict],
    train_emb: list[torch.Tensor],
    held: list[dict],
    args: argparse.Namespace,
) -> dict:
    """Fixed 2:4 masks + QAT int8dq, cosine distillation, then sparsify_ to the int8 2:4 format."""
    student = copy.deepcopy(teacher)
    masks = SemiSparseMasks.attach(student, encoder_linears)
    lowbit.quantize_(
        student, QATConfig(Int8DynamicActivationInt8WeightConfig(), "prepare"), filter_fn=encoder_linears
    )
    student.eval()  # no dropout: match the deterministic teacher
    losses, train_s = distill_train(
        student, train, train_emb, student.parameters(), args.lr, args.steps, args.seed, masks.reapply
    )
    masks.check()
    masks.remove()
    fake_quant = embed_all(student, held[:2])  # the served model must reproduce these bits
    report = sparsify_(student, Int8DQ24(), filter_fn=encoder_linears)
    served = embed_all(student, held)
    summary = loss_summary(losses, train_s, args.steps)
    return {
        **{k: summary[k] for k in ("train_seconds", "steps")},
        "lr": args.lr,
        **{k: summary[k] for k in ("loss_first", "loss_last")},
        "layers_2_4": len(report.sparsified),
        "layers_skipped": report.skipped,
        "served_equals_fake_quant": bool(torch.equal(fake_quant, served[: len(fake_quant)])),
        "embeddings": served,
    }


def run_accuracy(args: argparse.Namespace) -> int:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    teacher = AutoModel.from_pretrained(model_dir()).eval()
    train_s, held_s = load_sentences(args.seed)
    train = tokenize(tokenizer, train_s, args.batch_size, args.max_length)
    held = tokenize(tokenizer, held_s, args.batch_size, args.max_length)
    train_emb = [embed_all(teacher, [b]) for b in train]
    held_emb = embed_all(teacher, held)
    rows = [{"variant": "dense fp32 (teacher)", "held_out_cosine": 1.0}]

    def ptq(name: str, convert) -> None:
        student = copy.deepcopy(teacher)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(student)
        rows.append({"variant": name, "held_out_cosine": cosine(embed_all(student, held), held_emb)})
        print(f"{name:34s} cosine {rows[-1]['held_out_cosine']:.5f}", flush=True)

    ptq(
        "dense int8dq PTQ",
        lambda m: lowbit.quantize_(m, Int8DynamicActivationInt8WeightConfig(), filter_fn=encoder_linears),
    )
    ptq("2:4 fp32 PTQ (magnitude)", lambda m: sparsify_(m, SemiSparseConfig(), encoder_linears))
    ptq("2:4 + int8dq PTQ (magnitude)", lambda m: sparsify_(m, Int8DQ24(), encoder_linears))
    tuned = fine_tune(teacher, train, train_emb, held, args)
    rows.append(
        {
            "variant": "2:4 + int8dq fine-tuned (masks + QAT)",
            "held_out_cosine": cosine(tuned.pop("embeddings"), held_emb),
            **tuned,
        }
    )
    print(
        f"{rows[-1]['variant']:34s} cosine {rows[-1]['held_out_cosine']:.5f} "
        f"({tuned['train_seconds']:.0f}s, served == fake-quant: {tuned['served_equals_fake_quant']})"
    )
    result = {
        "benchmark": "sparsity_minilm",
        "model": MODEL_NOTE,
        "data": data_note(train_s, held_s),
        "metric": "held-out mean cosine(mean-pooled student, fp32 teacher)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **run_metadata(t_start, platform.processor() or platform.machine()),
        "rows": rows,
    }
    return write_json(result, args.out or RESULTS / "sparsity_minilm.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--accuracy", action="store_true", help="MiniLM accuracy (CPU)")
    mode.add_argument("--speed", action="store_true", help="kernel timings (CUDA GPU)")
    p.add_argument("--quick", action="store_true", help="--speed: one shape, three M")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    # NOTE: 1 thread: on a busy 2-core machine 2 OpenMP threads spin (60 steps: 378 s vs 88 s with 1).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--budget", type=float, default=200, help="--speed: seconds; the layout columns stop at 60%%"
    )
    p.add_argument(
        "--table",
        type=Path,
        default=None,
        help="--speed: also write the compact table lowbit.sparsity.speed reads (e.g. "
        "src/lowbit/data/sparsity_speed_h100.json)",
    )
    args = p.parse_args(argv)
    if args.accuracy:
        return run_accuracy(args)
    from sparsity_speed import run_speed  # benchmarks/sparsity_speed.py, beside this script

    result = run_speed(args)
    return 2 if result is None else write_json(result, args.out or RESULTS / "sparsity_speed.json")


if __name__ == "__main__":
    raise SystemExit(main())
