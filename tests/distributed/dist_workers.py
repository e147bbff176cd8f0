"""Bodies run on every rank by the distributed tests (importable by spawned processes)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

import lowbit
from lowbit.formats import configs as C

LINEAR_CONFIGS = {
    "int8dq": C.Int8DynamicActivationInt8WeightConfig(),
    "w4a8": C.Int8DynamicActivationInt4WeightConfig(group_size=32),
    "w4a8_asym": C.Int8DynamicActivationInt4WeightConfig(
        group_size=32, mapping=C.Mapping.ASYMMETRIC, zero_point_domain=C.ZeroPointDomain.INT
    ),
    "int8wo": C.Int8WeightOnlyConfig(),
    "int4wo": C.Int4WeightOnlyConfig(group_size=32),
    "fp8dq": C.Float8DynamicActivationFloat8WeightConfig(),
    "fp8wo": C.Float8WeightOnlyConfig(),
}

BF16_CASES = ("int8dq", "w4a8", "fp8dq")
# Explicit Triton kernels (TRITON_INTERPRET=1 on CPU): row-wise shards then run the W4A8 op on
# their int8 activations instead of the pure-PyTorch reference (fp16: the interpreter's bf16 dots
# are not trustworthy).
KERNEL_CONFIGS = {
    "w4a8_triton_g32_fp16": C.Int8DynamicActivationInt4WeightConfig(group_size=32, kernel="triton"),
    "w4a8_triton_row_fp16": C.Int8DynamicActivationInt4WeightConfig(group_size=None, kernel="triton"),
}
TP_LINEAR_CASES = list(LINEAR_CONFIGS) + [f"{n}_bf16" for n in BF16_CASES] + list(KERNEL_CONFIGS)


def tp_linear(rank: int, world: int) -> dict:
    from lowbit.distributed import ColwiseQuantLinear, RowwiseQuantLinear
    from lowbit.kernels import interpreter_enabled

    out = {}
    cases = [(n, torch.float32, LINEAR_CONFIGS[n]) for n in LINEAR_CONFIGS]
    cases += [(f"{n}_bf16", torch.bfloat16, LINEAR_CONFIGS[n]) for n in BF16_CASES]
    if interpreter_enabled():  # CPU machines (a GPU machine runs test_tp_cuda.py instead)
        cases += [(n, torch.float16, cfg) for n, cfg in KERNEL_CONFIGS.items()]
    for key, dtype, cfg in cases:
        torch.manual_seed(1)  # same weights and inputs on every rank
        lin = nn.Linear(128, 96).to(dtype)
        x = torch.randn(2, 7, 128, dtype=dtype)
        lowbit.quantize_(lin, cfg)
        with torch.no_grad():
            ref = lin(x)
            col = ColwiseQuantLinear(lin.weight, lin.bias, gather_output=True)(x)
            row = RowwiseQuantLinear(lin.weight, lin.bias, input_is_sharded=False, exact=True)(x)
            fast = RowwiseQuantLinear(lin.weight, lin.bias, input_is_sharded=False)
            row_fast, kernel_calls = _count_w4a8_q_calls(fast, x)
        out[key] = {"ref": ref, "col": col, "row": row, "row_fast": row_fast, "kernel_calls": kernel_calls}
    # Loading other weights into a built row-wise layer: its output follows the new weights
    # (nothing derived from the weights at construction goes stale).
    torch.manual_seed(2)
    a, b = nn.Linear(128, 96), nn.Linear(128, 96)
    for lin in (a, b):
        lowbit.quantize_(lin, LINEAR_CONFIGS["w4a8_asym"])
    x = torch.randn(5, 128)
    loaded = RowwiseQuantLinear(a.weight, a.bias, input_is_sharded=False)
    fresh = RowwiseQuantLinear(b.weight, b.bias, input_is_sharded=False)
    loaded.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        out["reloaded"] = {"loaded": loaded(x), "fresh": fresh(x)}
    return out


def _count_calls(owner, name: str, fn, *args) -> tuple:
    """fn(*args) and how many times it called owner.<name> (looked up at call time)."""
    calls, orig = [], getattr(owner, name)

    def counted(*a):
        calls.append(1)
        return orig(*a)

    setattr(owner, name, counted)
    try:
        return fn(*args), len(calls)
    finally:
        setattr(owner, name, orig)


def _count_w4a8_q_calls(fn, *args) -> tuple:
    """fn(*args) and how many times it ran the W4A8 op body on int8 activations."""
    from lowbit.kernels.w4a8 import op

    return _count_calls(op, "_w4a8_linear_q_impl", fn, *args)


def _count_partial_calls(fn, *args) -> tuple:
    """fn(*args) and how many times a row-wise shard ran the W4A8 kernel partial."""
    from lowbit.distributed import tp

    return _count_calls(tp, "w4a8_kernel_partial", fn, *args)


def _init_(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    for n, p in module.named_parameters():
        with torch.no_grad():
            p.copy_(
                1 + 0.1 * torch.randn(p.shape, generator=g)
                if "norm" in n
                else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5
            )


BLOCK_CONFIGS = ("int8dq", "w4a8", "fp8dq", "int4wo")


def tp_llama(rank: int, world: int) -> dict:
    from lowbit.distributed.llama import parallelize_llama, parallelize_llama_block
    from lowbit.llm.config import ModelArgs
    from lowbit.llm.model import Block, Transformer, rope_tables

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97)
    cos, sin = rope_tables(args, 6, torch.device("cpu"))
    out: dict = {}
    for name in BLOCK_CONFIGS:
        torch.manual_seed(3)
        block = Block(args)
        _init_(block)
        lowbit.quantize_(block, LINEAR_CONFIGS[name])
        x = torch.randn(2, 6, args.dim)
        tp = parallelize_llama_block(copy.deepcopy(block), exact=True)
        with torch.no_grad():
            out[name] = {"ref": block(x, cos, sin, None, False), "tp": tp(x, cos, sin, None, False)}
    # A split that does not fit (ffn 96 over 2 ranks = 48: not whole groups of 32) raises and
    # leaves the block as it was.
    bad = Block(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97))
    lowbit.quantize_(bad, LINEAR_CONFIGS["w4a8"])
    before = {n: type(m) for n, m in bad.named_modules()}
    try:
        parallelize_llama_block(bad)
        out["bad_split"] = {"raised": "", "untouched": False}
    except ValueError as e:
        after = {n: type(m) for n, m in bad.named_modules()}
        out["bad_split"] = {"raised": str(e), "untouched": after == before and bad.attention.n_heads == 4}
    # Greedy decoding through the KV cache: W4A8 TP tokens == single-process tokens.
    with torch.device("cpu"):
        model = Transformer(args)
    _init_(model)
    lowbit.quantize_(model, LINEAR_CONFIGS["w4a8"], filter_fn=lambda m, fqn: "layers" in fqn)
    tp_model = parallelize_llama(copy.deepcopy(model), exact=True)
    prompt = torch.tensor([[5, 17, 42, 8]])
    out["tokens"] = {
        "ref": _greedy(model, prompt, 6),
        "tp": _greedy(tp_model, prompt, 6),
    }
    return out


@torch.no_grad()
def _greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    t = prompt.shape[1]
    model.setup_caches(1, t + steps)
    dev = prompt.device
    logits = model(prompt, torch.arange(t, device=dev), prefill=True, last_only=True)
    toks = [logits.argmax(-1)]
    for i in range(steps - 1):
        logits = model(toks[-1], torch.tensor([t + i], device=dev))
        toks.append(logits[:, -1:].argmax(-1))
    return torch.cat(toks, 1)


def cpu_mesh(world: int):
    """A CPU device mesh: without one, FSDP2 moves the model to CUDA on a machine with a GPU."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def fsdp_float8(rank: int, world: int) -> dict:
    """One float8 training step (emulated on CPU) under FSDP2 vs the same step in one process."""
    from torch.distributed.fsdp import fully_shard

    from lowbit.float8_training import Float8TrainingConfig, convert_to_float8_training

    out = {}
    for recipe, same_batch in (("tensorwise", False), ("rowwise", False), ("tensorwise", True)):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))
        convert_to_float8_training(model, Float8TrainingConfig.from_recipe(recipe))
        x, target = torch.randn(16, 64), torch.randn(16, 64)
        ref = copy.deepcopy(model)
        ref_loss = nn.functional.mse_loss(ref(x), target)
        ref_loss.backward()
        torch.optim.SGD(ref.parameters(), lr=0.5).step()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=cpu_mesh(world))
        fully_shard(model, mesh=cpu_mesh(world))
        # Data parallel: each rank takes its half of the batch; FSDP2 averages the gradients.
        # same_batch: every rank takes the whole batch, so FSDP2's sharding, all-gathers and
        # gradient reduce-scatter are the only difference from one process.
        xs, ts = (x, target) if same_batch else (x.chunk(world)[rank], target.chunk(world)[rank])
        loss = nn.functional.mse_loss(model(xs), ts)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()  # updates each rank's shard
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        out[recipe + ("_same_batch" if same_batch else "")] = {
            "ref_loss": ref_loss.detach(),
            "loss": mean_loss,
            "ref_grads": {n: p.grad for n, p in ref.named_parameters()},
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
            "ref_params": {n: p.detach() for n, p in ref.named_parameters()},
            "params": {n: p.detach().full_tensor() for n, p in model.named_parameters()},
            "sharded": all(p.to_local().numel() < p.numel() for p in model.parameters()),
        }
    return out


def fsdp_float8_all_gather(rank: int, world: int) -> dict:
    """Three AdamW steps of FSDP2 float8 training (emulated on CPU), the weights all-gathered in
    float8 vs in high precision; data-parallel parts of the batch on each rank. With and without
    mixed precision (fp32 weights, bf16 compute). Over 3 ranks the shards are uneven (N=128, 64)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lowbit.float8_training import Float8TrainingConfig, convert_to_float8_training

    runs = {}
    for mp in ("fp32", "bf16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mp == "bf16" else MixedPrecisionPolicy()
        for f8_gather in (False, True):
            torch.manual_seed(5)
            # (the bias-free layer is all-gathered alone: a group of float8 bytes only)
            model = nn.Sequential(
                nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 48, bias=False), nn.SiLU(), nn.Linear(48, 64)
            )
            convert_to_float8_training(
                model, Float8TrainingConfig.from_recipe("tensorwise", fsdp_float8_all_gather=f8_gather)
            )
            seen: list = []

            def record(m: nn.Module, _, seen: list = seen) -> None:
                # runs after FSDP2's own pre-forward hook: the weight the forward GEMM receives
                seen.append((type(m.weight).__name__, getattr(m.weight, "_data", m.weight).dtype))

            for layer in (model[0], model[2], model[4]):
                fully_shard(layer, mesh=cpu_mesh(world), mp_policy=policy)
                layer.register_forward_pre_hook(record)
            fully_shard(model, mesh=cpu_mesh(world), mp_policy=policy)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            losses = []
            for step in range(3):
                g = torch.Generator().manual_seed(10 + step)
                x, target = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
                y = model(x.chunk(world)[rank])
                loss = nn.functional.mse_loss(y.float(), target.chunk(world)[rank])
                loss.backward()
                grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
            state = model.state_dict()
            runs[(mp, "float8" if f8_gather else "hp")] = {
                "losses": losses,
                "grads": grads,
                "params": {n: p.detach().full_tensor() for n, p in model.named_parameters()},
                # what a sharded checkpoint holds: the DTensors' local tensors
                "state_local_types": sorted({type(v.to_local()).__name__ for v in state.values()}),
                "state": {k: v.full_tensor() for k, v in state.items()},
                "seen": seen,
            }
    return runs


DTENSOR_CASES = {
    **{name: (cfg, 96) for name, cfg in LINEAR_CONFIGS.items()},
    "w4a8_row": (C.Int8DynamicActivationInt4WeightConfig(group_size=None), 96),
    "w4a8_one_group_per_shard": (C.Int8DynamicActivationInt4WeightConfig(group_size=64), 96),
    "w4a8_asym_one_group_per_shard": (
        C.Int8DynamicActivationInt4WeightConfig(
            group_size=64, mapping=C.Mapping.ASYMMETRIC, zero_point_domain=C.ZeroPointDomain.INT
        ),
        8,  # built so that the zero points coincide across the two K halves, the scales do not
    ),
    "fp8_per_tensor": (
        C.Float8DynamicActivationFloat8WeightConfig(granularity=C.Float8Granularity.TENSOR), 96
    ),
    "int8_one_row_per_rank": (C.Int8DynamicActivationInt8WeightConfig(), 2),
    "w4a8_row_one_row_per_rank": (C.Int8DynamicActivationInt4WeightConfig(group_size=None), 2),
}


def dtensor_roundtrip(rank: int, world: int) -> dict:
    """Quantized weights as DTensors: shard, gather back, and DTensor's own distribute_tensor."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from lowbit.distributed import distribute_quantized, gather_quantized, shard_quantized

    mesh = cpu_mesh(world)
    out: dict = {}
    for name, (cfg, n) in DTENSOR_CASES.items():
        for dim in (0, 1):
            torch.manual_seed(3)
            lin = nn.Linear(128, n)
            if name == "w4a8_asym_one_group_per_shard":
                with torch.no_grad():
                    lin.weight.copy_(_same_zero_point_halves(n))
            lowbit.quantize_(lin, cfg)
            w = lin.weight
            dw = distribute_quantized(w, mesh, dim)
            full = gather_quantized(dw)
            theirs = distribute_tensor(w, mesh, [Shard(dim)], src_data_rank=None)
            out[(name, dim)] = {
                "placements": [str(p) for p in dw.placements],
                "gathered_is_original": _same_quantized(full, w),
                "gathered_dequantizes": torch.equal(full.dequantize(), w.dequantize()),
                "distribute_tensor_is_shard": _same_quantized(
                    theirs.to_local(), shard_quantized(w, dim, rank, world)
                ),
                "distribute_tensor_gathers_back": _same_quantized(gather_quantized(theirs), w),
            }
    zp, sc = _asym_case_inner(DTENSOR_CASES["w4a8_asym_one_group_per_shard"][0])
    out["asym_edge"] = torch.equal(zp[:, 0], zp[:, 1]) and not torch.equal(sc[:, 0], sc[:, 1])
    # Uneven rows: every rank refuses alike (no rank left waiting in a collective).
    lin = nn.Linear(128, 97)
    lowbit.quantize_(lin, C.Int8DynamicActivationInt8WeightConfig())
    try:
        distribute_tensor(lin.weight, mesh, [Shard(0)], src_data_rank=None)
        out["uneven"] = ""
    except NotImplementedError as e:
        out["uneven"] = str(e)
    return out


def _same_zero_point_halves(n: int) -> torch.Tensor:
    """(n, 128) rows whose halves span [-1, 2] and [-2, 4]: asymmetric int4 with 64-groups gives
    both halves the same zero point and different scales."""
    half = torch.rand(n, 64) * 3 - 1
    half[:, 0], half[:, 1] = -1.0, 2.0
    return torch.cat([half, 2 * half], 1)


def _asym_case_inner(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    lin = nn.Linear(128, 8)
    with torch.no_grad():
        lin.weight.copy_(_same_zero_point_halves(8))
    lowbit.quantize_(lin, cfg)
    return lin.weight.zero_point, lin.weight.scale


def _same_quantized(a: torch.Tensor, b: torch.Tensor) -> bool:
    from lowbit.core.tensor import QuantizedTensor

    if not isinstance(b, QuantizedTensor):
        return torch.equal(a, b)
    return (
        type(a) is type(b)
        and a.shape == b.shape
        and a.attributes() == b.attributes()
        and all(_same_bytes(x, y) for x, y in zip(a.inner_tensors(), b.inner_tensors()))
    )


def _same_bytes(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    if x is None or y is None:
        return x is None and y is None
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.element_size() == 1:  # (float8 has no CPU equality kernel)
        x, y = x.view(torch.uint8), y.view(torch.uint8)
    return torch.equal(x, y)


def tp_llama_cuda(rank: int, world: int) -> dict:
    """GPU machine, both ranks on cuda:0 over gloo (NCCL needs one GPU per rank): a W4A8 Llama
    on the real kernels, TP=1 vs TP=2 greedy tokens (column-wise kernels on N shards, row-wise
    Triton op on int8 activations with float32 partials)."""
    from lowbit.distributed.llama import parallelize_llama
    from lowbit.llm.checkpoint import RandomWeights
    from lowbit.llm.config import ModelArgs
    from lowbit.llm.loading import ConfigQuantizer, build_model

    dev = torch.device("cuda", 0)
    args = ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=2816, vocab_size=512)
    out = {}
    for group in (None, 128):
        cfg = C.Int8DynamicActivationInt4WeightConfig(group_size=group)
        model = build_model(args, RandomWeights(args, 0), ConfigQuantizer(cfg), dev, torch.bfloat16)
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, args.vocab_size, (1, 24), generator=g).to(dev)
        text = torch.randint(0, args.vocab_size, (1, 64), generator=g).to(dev)
        ref, ref_logits = _greedy(model, prompt, 24), _logits(model, text)
        parallelize_llama(model)
        tp_logits, kernel_calls = _count_partial_calls(_logits, model, text)
        out["row" if group is None else f"g{group}"] = {
            "ref": ref.cpu(), "tp": _greedy(model, prompt, 24).cpu(), "kernel_calls": kernel_calls,
            "ref_logits": ref_logits, "tp_logits": tp_logits,
        }
    return out


@torch.no_grad()
def _logits(model, text: torch.Tensor) -> torch.Tensor:
    """Logits at every position of `text` (one prefill through the KV cache), float32 on CPU."""
    t = text.shape[1]
    model.setup_caches(1, t)
    return model(text, torch.arange(t, device=text.device), prefill=True).float().cpu()


def hang_on_rank1(rank: int, world: int) -> None:
    """Rank 1 never joins the collective: the launcher must kill both and fail, not hang."""
    if rank == 1:
        import time

        time.sleep(3600)
    dist.all_reduce(torch.ones(1))
