"""Multi-GPU checks and timings: tensor-parallel W4A8 generation and FSDP2 float8 training.

Run with torchrun on one host (NCCL), e.g. on 2 GPUs:
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py tp --model llama-2-7b
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py fsdp --dim 4096 --layers 8
    python benchmarks/bench_distributed.py --help
    # CPU smoke test of the plumbing (gloo, tiny shapes; timings meaningless):
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py tp --model tiny --kernel reference --group-size 32 \
        --prompt-len 8 --new-tokens 8

tp:   every rank builds the same W4A8 model (random weights at the preset's shapes, or a HF
      checkpoint directory), greedy-decodes --new-tokens tokens unsharded (TP=1), then shards
      it with lowbit.distributed.llama.parallelize_llama and decodes again (TP=world). Reports
      whether the tokens are equal and decode tokens/s of both. With --kernel reference both
      runs use the pure-PyTorch integer path and the row-wise layers run with exact=True: the
      tokens must then be identical. With the default kernels the row-wise shards run the same
      Triton W4A8 op on their int8 activations and all-reduce float32 partial outputs: a
      different summation order than one process, so a rare argmax tie may differ.
fsdp: a stack of MLP blocks (bf16 weights), fully_shard per block; median step time of
      float8 training (convert_to_float8_training, --recipe) vs plain bf16, both under FSDP2;
      with the tensorwise recipe also float8 training whose weights are all-gathered in float8
      (Float8TrainingConfig(fsdp_float8_all_gather=True)).
Rank 0 prints one JSON line per result (and appends them to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from lowbit.bench import git_sha
from lowbit.distributed.launch import init_tensor_parallel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="mode", required=True)
    tp = sub.add_parser("tp", help="TP=world W4A8 greedy generation vs TP=1")
    tp.add_argument("--model", default="llama-2-7b", help="preset name (random weights) or HF checkpoint dir")
    tp.add_argument("--prompt-len", type=int, default=32)
    tp.add_argument("--new-tokens", type=int, default=64)
    tp.add_argument("--group-size", type=int, default=128, help="int4 group size (0: per row)")
    tp.add_argument("--kernel", choices=["auto", "reference"], default="auto")
    fs = sub.add_parser("fsdp", help="FSDP2 float8 training step time vs bf16 FSDP2")
    fs.add_argument("--dim", type=int, default=4096)
    fs.add_argument("--layers", type=int, default=8)
    fs.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step")
    fs.add_argument("--recipe", default="tensorwise", choices=["tensorwise", "rowwise", "rowwise_with_gw_hp"])
    fs.add_argument("--steps", type=int, default=20)
    fs.add_argument("--compile", action="store_true", help="torch.compile each block")
    for s in (tp, fs):
        s.add_argument("--out", default=None, help="append JSON lines here (rank 0)")
    return p.parse_args(argv)


def emit(args: argparse.Namespace, row: dict) -> None:
    if dist.get_rank() != 0:
        return
    row = {
        **row,
        "world": dist.get_world_size(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "git_sha": git_sha() or "unknown",
    }
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    device = prompt.device
    t = prompt.shape[1]
    model.setup_caches(1, t + steps)
    toks = [model(prompt, torch.arange(t, device=prompt.device), prefill=True, last_only=True).argmax(-1)]
    sync(device)
    start = time.perf_counter()
    for i in range(steps - 1):
        logits = model(toks[-1], torch.tensor([t + i], device=prompt.device))
        toks.append(logits[:, -1:].argmax(-1))
    sync(device)
    return torch.cat(toks, 1), (steps - 1) / (time.perf_counter() - start)


def run_tp(args: argparse.Namespace, device: torch.device) -> None:
    from lowbit.core.kernel_choice import KernelChoice
    from lowbit.distributed.llama import parallelize_llama
    from lowbit.formats.configs import Int8DynamicActivationInt4WeightConfig
    from lowbit.llm.checkpoint import HFCheckpoint, RandomWeights
    from lowbit.llm.config import preset
    from lowbit.llm.loading import ConfigQuantizer, build_model

    kernel = KernelChoice.REFERENCE if args.kernel == "reference" else KernelChoice.AUTO
    group = args.group_size or None  # 0: per row
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=group, kernel=kernel)
    if os.path.isdir(args.model):
        ckpt = HFCheckpoint(args.model)
        model_args, source = ckpt.args, ckpt
    else:
        model_args = preset(args.model)
        source = RandomWeights(model_args, 0)  # same seed on every rank: same weights
    model = build_model(
        model_args, source, ConfigQuantizer(cfg), device, torch.bfloat16, quantize_output=False
    )
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model_args.vocab_size, (1, args.prompt_len), generator=g).to(device)
    ref, ref_tps = greedy(model, prompt, args.new_tokens)
    parallelize_llama(model, exact=args.kernel == "reference")
    out, tp_tps = greedy(model, prompt, args.new_tokens)
    same = int((out == ref).all(0).cumprod(0).sum())  # tokens equal before the first difference
    emit(
        args,
        {
            "bench": "tp_w4a8_greedy",
            "model": args.model,
            "kernel": args.kernel,
            "tokens_equal": bool(torch.equal(out, ref)),
            "equal_prefix": same,
            "new_tokens": args.new_tokens,
            "tp1_tok_s": ref_tps,
            "tp_tok_s": tp_tps,
        },
    )


def mlp_stack(dim: int, layers: int, device: torch.device) -> nn.Module:
    blocks = [
        nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))
        for _ in range(layers)
    ]
    return nn.Sequential(*blocks).to(device=device, dtype=torch.bfloat16)


def time_fsdp(args: argparse.Namespace, device: torch.device, float8: bool, f8_gather: bool = False) -> float:
    from torch.distributed.fsdp import fully_shard

    from lowbit.float8_training import Float8TrainingConfig, convert_to_float8_training

    torch.manual_seed(0)
    model = mlp_stack(args.dim, args.layers, device)
    if float8:
        config = Float8TrainingConfig.from_recipe(args.recipe, fsdp_float8_all_gather=f8_gather)
        convert_to_float8_training(model, config)
    for block in model:
        fully_shard(block)
        if args.compile:
            block.compile()
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=torch.bfloat16)
    times = []
    for step in range(args.steps + 3):  # 3 warm-up steps (compile, allocator)
        sync(device)
        t0 = time.perf_counter()
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= 3:
            times.append(time.perf_counter() - t0)
    del model, opt
    return statistics.median(times)


def run_fsdp(args: argparse.Namespace, device: torch.device) -> None:
    bf16 = time_fsdp(args, device, float8=False)
    f8 = time_fsdp(args, device, float8=True)
    # float8 all-gather of the weights: tensorwise weight scaling only
    f8_gather = time_fsdp(args, device, float8=True, f8_gather=True) if args.recipe == "tensorwise" else None
    emit(
        args,
        {
            "bench": "fsdp2_float8_step",
            "recipe": args.recipe,
            "dim": args.dim,
            "layers": args.layers,
            "tokens_per_rank": args.tokens,
            "compile": args.compile,
            "bf16_ms": bf16 * 1e3,
            "float8_ms": f8 * 1e3,
            "speedup": bf16 / f8,
            "float8_all_gather_ms": None if f8_gather is None else f8_gather * 1e3,
            "speedup_float8_all_gather": None if f8_gather is None else bf16 / f8_gather,
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit(
            "run under torchrun, e.g. torchrun --nproc-per-node 2 benchmarks/bench_distributed.py tp"
        )
    # cuda:LOCAL_RANK with NCCL, or a CPU smoke run under gloo (checks the plumbing; the timings mean nothing)
    device, _ = init_tensor_parallel(int(os.environ["WORLD_SIZE"]))
    try:
        (run_tp if args.mode == "tp" else run_fsdp)(args, device)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
