"""Load a model once, run timed generations on it, report one flat dict per run.

Shared by `lowbit generate`, `lowbit eval` and benchmarks/bench_llm.py, so every number
is measured the same way:
  ttft_s              prompt on device -> first new token on device (one prefill + sample; a
                      CUDA-graph replay for short prompts with compile / cuda_graph)
  prefill_tokens_per_s  batch * prompt_len / ttft_s
  decode_tokens_per_s   batch * (max_new_tokens - 1) / decode time (all sequences together)
  decode_steps_per_s    (max_new_tokens - 1) / decode time (one step = one token per sequence)
  bandwidth_gb_s      weight bytes read per decode step x decode_steps_per_s (the input
                      embedding table is excluded: a step reads one row of it)
  model_size_gb       parameters + persistent buffers as stored (quantized inner tensors,
                      scales, zero points; no KV cache, no RoPE tables)
  peak_*              CUDA: max_memory_allocated/reserved from just before the KV cache is
                      allocated to the end of the run (model resident, warm-up and compile
                      included); load_peak_* covers building the model. CPU: process peak RSS.
  compile_time_s      wall time of the warm-up decode steps with torch.compile (trace, compile,
                      CUDA-graph recording); None when not compiled.
  warmup_s            wall time of the warm-up decode steps (with cuda_graph: eager runs and
                      the capture of the eager step's CUDA graph).
  tp                  tensor-parallel ranks (lowbit generate --tp N under torchrun); with tp > 1
                      model_size_*, bandwidth and peak_* are this rank's (rank 0 reports)
  cuda_graph          RunOptions.cuda_graph: capture the eager decode step as a CUDA graph;
  cuda_graph_replayed   whether the timed decode steps actually replayed one (False off CUDA or
                      when the capture failed: decode then ran eagerly).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from lowbit.llm.generate import Generator, Sampling, synchronize
from lowbit.llm.loading import LOWBIT_FORMATS, Quantizer, build_model, make_quantizer, resolve_source
from lowbit.llm.metrics import GB, MemoryMeter, device_name, model_size, versions
from lowbit.llm.model import Transformer
from lowbit.llm.tokenizer import Tokenizer, encode_checked, load_tokenizer

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}
DEFAULT_PROMPT = "The capital of France is Paris. The capital of Germany is"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is unknown; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadOptions:
    model: str
    random_weights: bool = False
    quant: str = "none"
    decode_quant: str | None = None
    group_size: int | None = None
    decode_threshold: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    quantize_output: bool = True
    tp: int = 1  # tensor-parallel ranks (> 1: run under torchrun, one process per GPU)


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    quantizer: Quantizer
    source: str
    device: torch.device
    dtype: torch.dtype
    load_time_s: float
    load_memory: dict[str, Any]
    options: LoadOptions
    cuda_allocator: str | None = None  # the allocator setting load() applied (CUDA only)
    owns_process_group: bool = False  # load() created the --tp process group: close() ends it

    def close(self) -> None:
        """End the process group that load() started for --tp (no-op otherwise)."""
        if self.owns_process_group:
            _end_process_group()
            self.owns_process_group = False


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def configure_cuda_allocator() -> str:
    """Expandable segments for the CUDA caching allocator unless the user chose settings.

    Generation allocates blocks of many sizes (per-layer quantization staging, compile, CUDA
    graph pools, the KV cache); fixed-size segments keep the gaps reserved. Llama-2-7B W4A8 on
    an H100, batch 1: peak reserved 4.54 GB with fixed segments for 3.71 GB allocated. A user's
    own PYTORCH_CUDA_ALLOC_CONF always wins; the returned string is recorded in each result row.
    """
    user = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if user:
        return user
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None or not torch.cuda.is_available():
        return "default"
    with warnings.catch_warnings():  # torch 2.11 warns about this private setter on every use
        warnings.simplefilter("ignore")
        setter("expandable_segments:True")
    return "expandable_segments:True"


def _tensor_parallel(opts: LoadOptions) -> tuple[torch.device, bool, Any]:
    """--tp N: this rank's device, whether the process group is ours, and the build hook that
    shards each block right after it is quantized (a rank never holds more than one whole block)."""
    if opts.decode_quant is not None:
        raise ValueError("--tp does not take --decode-quant (one weight per linear is sharded)")
    if opts.quant not in ("none", *LOWBIT_FORMATS):
        raise ValueError(f"--tp shards lowbit's formats ({', '.join(LOWBIT_FORMATS)}) or none, "
                         f"not {opts.quant}")
    from lowbit.distributed.launch import init_tensor_parallel
    from lowbit.distributed.llama import parallelize_llama_block

    device, owns = init_tensor_parallel(opts.tp, opts.device)

    def shard(i: int, model: Transformer) -> None:
        parallelize_llama_block(model.blocks()[i])

    return device, owns, shard


def load(opts: LoadOptions, quantizer: Quantizer | None = None) -> Loaded:
    if opts.tp < 1:
        raise ValueError(f"--tp {opts.tp} must be >= 1")
    if opts.tp > 1:
        device, owns_group, on_block = _tensor_parallel(opts)
    else:
        device, owns_group, on_block = resolve_device(opts.device), False, None
    try:
        loaded = _load(opts, quantizer, device, on_block)
    except BaseException:
        if owns_group:  # a failed load leaves no process group behind
            _end_process_group()
        raise
    loaded.owns_process_group = owns_group
    return loaded


def _load(opts: LoadOptions, quantizer: Quantizer | None, device: torch.device, on_block: Any) -> Loaded:
    allocator = configure_cuda_allocator() if device.type == "cuda" else None
    dtype = resolve_dtype(opts.dtype, device)
    quantizer = quantizer or make_quantizer(
        opts.quant, opts.decode_quant, opts.group_size, opts.decode_threshold
    )
    args, source = resolve_source(opts.model, opts.random_weights, opts.seed)
    meter = MemoryMeter(device)
    meter.reset()
    t0 = time.perf_counter()
    model = build_model(
        args, source, quantizer, device, dtype, quantize_output=opts.quantize_output, on_block=on_block
    )
    synchronize(device)
    load_time = time.perf_counter() - t0
    tokenizer = load_tokenizer(opts.model, args.vocab_size)
    return Loaded(
        model, tokenizer, quantizer, source.describe(), device, dtype, load_time, meter.read(), opts,
        allocator,
    )


@dataclass
class RunOptions:
    batch_size: int = 1
    prompt_len: int | None = None  # None: the prompt text as tokenized
    prompt: str | None = None  # None: DEFAULT_PROMPT, or random token ids when prompt_len is set
    max_new_tokens: int = 32
    max_seq_len: int | None = None  # KV cache length; None: prompt_len + max_new_tokens
    compile: bool = False
    compile_mode: str | None = "auto"  # auto: reduce-overhead (CUDA graphs) on CUDA, default on CPU
    cuda_graph: bool = False  # capture the eager decode step in a CUDA graph (not with compile)
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    warmup: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def make_prompt(loaded: Loaded, opts: RunOptions) -> torch.Tensor:
    """(batch, prompt_len) int64 on the model device.

    A text prompt is tokenized and repeated/truncated to prompt_len (same for every row);
    with only prompt_len, each row gets its own seeded random token ids."""
    b = opts.batch_size
    vocab = loaded.model.args.vocab_size
    if b < 1:
        raise ValueError(f"--batch-size {b} must be >= 1")
    if opts.prompt_len is not None and opts.prompt_len < 1:
        raise ValueError(f"--prompt-len {opts.prompt_len} must be >= 1")
    if opts.prompt is None and opts.prompt_len is not None:
        gen = torch.Generator().manual_seed(opts.seed)
        ids = torch.randint(0, vocab, (b, opts.prompt_len), generator=gen)
        return ids.to(loaded.device)
    ids_list = encode_checked(loaded.tokenizer, opts.prompt or DEFAULT_PROMPT, vocab)
    if not ids_list:
        raise ValueError("the prompt tokenizes to zero tokens")
    if opts.prompt_len is not None:
        reps = -(-opts.prompt_len // len(ids_list))
        ids_list = (ids_list * reps)[: opts.prompt_len]
    return torch.tensor([ids_list] * b, dtype=torch.long, device=loaded.device)


def _compile_mode(opts: RunOptions, device: torch.device) -> str | None:
    if not opts.compile:
        return None
    if opts.compile_mode in (None, "auto"):
        return "reduce-overhead" if device.type == "cuda" else None
    return opts.compile_mode


def run(loaded: Loaded, opts: RunOptions) -> dict[str, Any]:
    """One timed generation on `loaded.model`; returns the flat result row."""
    model, device = loaded.model, loaded.device
    prompt = make_prompt(loaded, opts)
    b, t = prompt.shape
    max_seq = opts.max_seq_len or t + opts.max_new_tokens
    mode = _compile_mode(opts, device)
    meter = MemoryMeter(device)
    sampling = Sampling(opts.temperature, opts.top_k)
    gen = Generator(model, sampling, compile=opts.compile, compile_mode=mode, cuda_graph=opts.cuda_graph)
    meter.reset()
    model.setup_caches(b, max_seq)
    try:
        gen.check(prompt, opts.max_new_tokens)
        warm = gen.warmup(prompt) if opts.warmup else None
        torch.manual_seed(opts.seed)
        res = gen.generate(prompt, opts.max_new_tokens)
        mem = meter.read()
        size = model_size(model)
    finally:
        model.free_caches()
    steps = res.decode_steps_per_s
    new_ids = res.tokens[0, t:].tolist()
    row: dict[str, Any] = {
        "model": model.args.name,
        "source": loaded.source,
        "quant": loaded.quantizer.label,
        "quant_config": loaded.quantizer.describe(),
        "quantize_output": loaded.options.quantize_output,
        "tp": loaded.options.tp,
        "batch_size": b,
        "prompt_len": t,
        "max_new_tokens": opts.max_new_tokens,
        "max_seq_len": max_seq,
        "compile": opts.compile,
        "compile_mode": mode,
        "cuda_graph": opts.cuda_graph,
        "cuda_graph_replayed": gen.decode_graphed,
        "sampling": {"temperature": opts.temperature, "top_k": opts.top_k, "seed": opts.seed},
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "ttft_s": res.ttft_s,
        "prefill_tokens_per_s": res.prefill_tokens_per_s,
        "decode_s": res.decode_s,
        "decode_tokens_per_s": res.decode_tokens_per_s,
        "decode_steps_per_s": steps,
        "bandwidth_gb_s": None if steps is None else size.read_per_step_bytes * steps / GB,
        "model_size_gb": size.total_bytes / GB,
        "model_size_bytes": size.total_bytes,
        "model_size_no_embedding_gb": size.read_per_step_bytes / GB,
        "kv_cache_gb": size.kv_cache_bytes / GB,
        "peak_memory_kind": mem["kind"],
        "cuda_allocator": loaded.cuda_allocator,
        "peak_allocated_gb": mem.get("allocated_gb"),
        "peak_reserved_gb": mem.get("reserved_gb"),
        "peak_rss_gb": mem.get("rss_gb"),
        "load_time_s": loaded.load_time_s,
        "load_peak_allocated_gb": loaded.load_memory.get("allocated_gb"),
        "load_peak_reserved_gb": loaded.load_memory.get("reserved_gb"),
        "compile_time_s": warm if opts.compile else None,
        "warmup_s": warm,
        "tokenizer": loaded.tokenizer.name,
        "generated_ids": new_ids,
        "generated_text": loaded.tokenizer.decode(new_ids),
        "versions": versions(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    row.update(opts.extra)
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_row(r: dict[str, Any]) -> str:
    """One line per run for the terminal."""
    mem = (
        f"peak {_fmt(r['peak_allocated_gb'], '.2f')}/{_fmt(r['peak_reserved_gb'], '.2f')} GB alloc/res"
        if r["peak_allocated_gb"] is not None
        else f"peak RSS {_fmt(r['peak_rss_gb'], '.2f')} GB (process)"
    )
    comp = f" | compile {r['compile_time_s']:.1f} s" if r["compile_time_s"] is not None else ""
    if r.get("cuda_graph"):
        how = "replayed" if r.get("cuda_graph_replayed") else "NOT replayed: eager decode"
        comp += f" | CUDA graph of the eager step {how}, warm-up {_fmt(r['warmup_s'], '.1f')} s"
    tp = f" tp={r['tp']}" if r.get("tp", 1) > 1 else ""
    return (
        f"{r['model']} {r['quant']} {r['dtype']}{tp} "
        f"bs={r['batch_size']} prompt={r['prompt_len']} "
        f"new={r['max_new_tokens']}: TTFT {r['ttft_s'] * 1e3:.1f} ms | prefill "
        f"{r['prefill_tokens_per_s']:.0f} tok/s | decode {_fmt(r['decode_tokens_per_s'], '.1f')} tok/s"
        f" | {_fmt(r['bandwidth_gb_s'], '.1f')} GB/s | size {r['model_size_gb']:.3f} GB | {mem}{comp}"
    )
