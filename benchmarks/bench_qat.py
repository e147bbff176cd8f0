"""QAT vs PTQ on a real model: MiniLM (all-MiniLM-L6-v2) embedding self-distillation.

Teacher: the fp32 model. Student: a quantized copy (every encoder nn.Linear).
Loss: 1 - cosine similarity between the student's and the teacher's mean-pooled
sentence embeddings. Text: English sentences from the Python docs that ship with
Python (`pydoc_data.topics`), split into train and held-out sets.

Metric: degradation = 1 - mean cosine(student, teacher) on the held-out sentences,
for post-training quantization (PTQ) and for QAT (prepare -> train -> convert; the
converted model is what is measured). recovered = 1 - deg_qat / deg_ptq.
The run also checks that the converted model's embeddings equal the fake-quant
model's bit for bit (`torch.equal`).

    python benchmarks/bench_qat.py            # ~3-6 minutes on a 2-core CPU
    python benchmarks/bench_qat.py --steps 20 --out /tmp/qat.json   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lowbit  # noqa: E402
from lowbit import QATConfig  # noqa: E402
from lowbit.bench import cpu_name, run_metadata  # noqa: E402
from lowbit.formats.configs import QuantConfig  # noqa: E402
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

RESULTS = Path(__file__).resolve().parent / "results" / "qat_minilm.json"


def degradation(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean().item()


def run_qat(
    teacher: nn.Module,
    cfg: QuantConfig,
    train: list[dict],
    train_emb: list[torch.Tensor],
    held: list[dict],
    args: argparse.Namespace,
    learnable: bool,
) -> dict:
    student = copy.deepcopy(teacher)
    lowbit.quantize_(
        student, QATConfig(cfg, "prepare", learnable_qparams=learnable), filter_fn=encoder_linears
    )
    student.eval()  # no dropout: the student should match the deterministic teacher
    weights = [
        p for n, p in student.named_parameters() if not n.endswith(("weight_scale", "weight_zero_point"))
    ]
    qparams = [p for n, p in student.named_parameters() if n.endswith(("weight_scale", "weight_zero_point"))]
    groups = [{"params": weights, "lr": args.lr}]
    if qparams:
        groups.append({"params": qparams, "lr": args.qparam_lr})
    losses, train_s = distill_train(student, train, train_emb, groups, args.lr, args.steps, args.seed)
    # The bit-exactness check runs on a few held-out batches (the fake-quant forward is slow).
    check = held[: args.check_batches]
    fake_quant = embed_all(student, check)
    lowbit.quantize_(student, QATConfig(cfg, "convert"), filter_fn=encoder_linears)
    converted = embed_all(student, held)
    return {
        **loss_summary(losses, train_s, args.steps),
        "converted_equals_fake_quant": bool(torch.equal(fake_quant, converted[: len(fake_quant)])),
        "embeddings": converted,
    }


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it (no machine paths in results)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(repo))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--qparam-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-batches", type=int, default=2)
    # NOTE: one intra-op thread: on a busy 2-core machine two threads made 8 training steps
    # take 150 s instead of 12 s (they spin waiting on each other).
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--formats", default="w4a8,int4wo-g32,int4wo-g128,int4wo-g128-lq")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModel, AutoTokenizer

    t_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    teacher = AutoModel.from_pretrained(model_dir()).eval()
    train_s, held_s = load_sentences(args.seed)
    train = tokenize(tokenizer, train_s, args.batch_size, args.max_length)
    held = tokenize(tokenizer, held_s, args.batch_size, args.max_length)
    train_emb = [embed_all(teacher, [b]) for b in train]
    held_emb = embed_all(teacher, held)
    formats = {
        "w4a8": (lowbit.W4A8Config(), False),
        "w4a8-g32": (lowbit.W4A8Config(group_size=32), False),
        "int4wo-g32": (lowbit.Int4WeightOnlyConfig(group_size=32), False),
        "int4wo-g128": (lowbit.Int4WeightOnlyConfig(group_size=128), False),
        "int4wo-g128-lq": (lowbit.Int4WeightOnlyConfig(group_size=128), True),
        "w4a8-lq": (lowbit.W4A8Config(), True),
    }
    rows = []
    for name in args.formats.split(","):
        cfg, learnable = formats[name]
        ptq = copy.deepcopy(teacher)
        lowbit.quantize_(ptq, cfg, filter_fn=encoder_linears)
        deg_ptq = degradation(embed_all(ptq, held), held_emb)
        qat = run_qat(teacher, cfg, train, train_emb, held, args, learnable)
        deg_qat = degradation(qat.pop("embeddings"), held_emb)
        row = {
            "format": name,
            "config": cfg.to_dict(),
            "learnable_qparams": learnable,
            "ptq_cosine": 1 - deg_ptq,
            "qat_cosine": 1 - deg_qat,
            "ptq_degradation": deg_ptq,
            "qat_degradation": deg_qat,
            "recovered": 1 - deg_qat / deg_ptq if deg_ptq > 0 else None,
            **qat,
        }
        rows.append(row)
        print(
            f"{name:16s} PTQ 1-cos {deg_ptq:.5f}  QAT 1-cos {deg_qat:.5f}  recovered "
            f"{row['recovered']:.0%}  ({qat['train_seconds']:.0f}s, convert==fake-quant: "
            f"{qat['converted_equals_fake_quant']})",
            flush=True,
        )
    result = {
        "benchmark": "qat_minilm",
        "model": MODEL_NOTE,
        "data": data_note(train_s, held_s),
        "loss": "1 - cosine(mean-pooled student, fp32 teacher)",
        "settings": {k: (_shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **run_metadata(t_start, cpu_name()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
