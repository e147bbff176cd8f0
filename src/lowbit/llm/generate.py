"""Prefill + decode loop with greedy or top-k/temperature sampling.

Prefill runs eagerly (one big compute-bound call per prompt); the decode step can be
compiled (`mode="reduce-overhead"` captures it into a CUDA graph on GPU), or captured eagerly
into a CUDA graph without compiling (`cuda_graph=True`). Both are timed with
device synchronisation so TTFT and tokens/s are wall-clock facts, not launch times.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.llm.model import Transformer
from lowbit.llm.phased import Phase, use_phase


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); top_k None = the whole vocabulary."""

    temperature: float = 0.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"Sampling.temperature={self.temperature!r} must be a number >= 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"Sampling.top_k={self.top_k!r} must be None or an int >= 1")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) int64 tokens.

    Sampling uses the exponential race (argmax of p / Exp(1) draws is a draw from p): no
    host sync and no multinomial, so it captures into a CUDA graph.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(dim=-1, keepdim=True)


def decode_step(
    model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, temperature: float, top_k: int | None
) -> torch.Tensor:
    logits = model(tokens, input_pos)
    return sample(logits[:, -1], temperature, top_k)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (B, prompt_len + new_tokens) on the model device
    prompt_len: int
    new_tokens: int
    ttft_s: float  # prompt on device -> first new token on device
    decode_s: float  # the remaining new_tokens - 1 tokens

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.ttft_s

    @property
    def decode_steps(self) -> int:
        return self.new_tokens - 1

    @property
    def decode_steps_per_s(self) -> float | None:
        return self.decode_steps / self.decode_s if self.decode_steps > 0 and self.decode_s > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        s = self.decode_steps_per_s
        return None if s is None else s * self.batch


# NOTE: prompts up to this many tokens prefill as a CUDA-graph replay (GPU, compiled generator).
# Short eager prefills are launch-bound: Llama-2-7B at 32 tokens took 59.6 ms (W4A8) / 31.4 ms
# (bf16) eagerly (results/llm_llama2_7b_row_b1_eager_prefill_h100.json); longer ones are GEMM-bound.
GRAPH_PREFILL_MAX = 512
GRAPH_PREFILL_MIN_BUCKET = 16


def prefill_bucket(tokens: int) -> int:
    """Padded prompt length of a graphed prefill: the next power of two, at least 16."""
    return max(GRAPH_PREFILL_MIN_BUCKET, 1 << max(tokens - 1, 0).bit_length())


def _warm_and_capture(run: Callable[[], torch.Tensor], device: torch.device,
                      pool: Any) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Two eager runs on a side stream (autotuning, lazy workspaces, caches), then run captured.

    On the device's own current stream, restored on exit: a capture that fails inside
    torch.cuda.graph leaves its capture stream current otherwise."""
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                out = run()
        except BaseException:
            _restore_cuda_rng(device)
            raise
    return graph, out


def _restore_cuda_rng(device: torch.device) -> None:
    """After a failed capture torch's CUDA generator stays registered to the dead graph: every
    later random op raises 'Offset increment outside graph capture encountered unexpectedly'
    (torch 2.11). A fresh copy of its state (same seed and offset) makes it usable again."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    gen = torch.cuda.default_generators[index]
    if hasattr(gen, "graphsafe_set_state") and hasattr(gen, "clone_state"):
        gen.graphsafe_set_state(gen.clone_state())


def _capture_error(e: BaseException) -> str:
    """The first line of the error that broke a capture (torch re-raises it as 'operation failed
    due to a previous error during capture', with the cause as the context)."""
    cause = e.__context__ if e.__context__ is not None else e
    return f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"


class _PrefillGraph:
    """One captured prefill of a (batch, padded length): static inputs, a replayable graph."""

    def __init__(self, model: Transformer, batch: int, length: int, device: torch.device,
                 pool: Any) -> None:
        self.ids = torch.zeros((batch, length), dtype=torch.long, device=device)
        self.pos = torch.arange(length, device=device)
        self.last = torch.zeros(1, dtype=torch.long, device=device)
        self.model = model
        self.graph, self.logits = _warm_and_capture(self._run, device, pool)

    def _run(self) -> torch.Tensor:
        with use_phase(self.model, Phase.PREFILL):
            return self.model(self.ids, self.pos, prefill=True, select=self.last)

    def __call__(self, prompt: torch.Tensor) -> torch.Tensor:
        t = prompt.shape[1]
        # Right padding is invisible to the real tokens (causal attention); its cache entries lie
        # past the prompt, where each decode step writes its position before attending to it.
        self.ids[:, t:].zero_()
        self.ids[:, :t].copy_(prompt)
        self.last.fill_(t - 1)
        self.graph.replay()
        return self.logits


class _DecodeGraph:
    """The eager decode step of one batch size, captured: static token / position inputs.

    Captured at the first step it serves, from that step's own token and position: the eager
    warm-up runs compute exactly that step (the same KV-cache writes the replay then repeats)."""

    def __init__(self, model: Transformer, tok: torch.Tensor, pos: torch.Tensor, sampling: Sampling) -> None:
        self.tok = tok.clone()
        self.pos = pos.clone()
        self.model = model
        self.sampling = sampling
        self.graph, self.out = _warm_and_capture(self._run, tok.device, None)  # a private pool

    def _run(self) -> torch.Tensor:
        return decode_step(self.model, self.tok, self.pos, self.sampling.temperature, self.sampling.top_k)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.out


class Generator:
    """Runs prefill + decode on a model whose caches are set up (`model.setup_caches`).

    compile=True compiles the decode step (CUDA graphs with mode="reduce-overhead") and, on CUDA,
    replays prompts of up to GRAPH_PREFILL_MAX tokens as captured prefills (graph_prefill=None
    means: when compiled on CUDA or with cuda_graph), one graph per (batch, padded length)
    captured on first use. cuda_graph=True (not with compile) captures the *eager* decode step
    in a CUDA graph per (batch size, sampling settings) instead: no compile time, no per-kernel
    host launch cost; without Inductor's fusions of the small ops. Off CUDA it does nothing.
    Captured graphs read the model's tensors as they were at capture: new KV caches or RoPE
    tables (model.cache_version) drop them; after replacing weights, make a new Generator.
    """

    def __init__(
        self,
        model: Transformer,
        sampling: Sampling = Sampling(),
        *,
        compile: bool = False,
        compile_mode: str | None = None,
        graph_prefill: bool | None = None,
        cuda_graph: bool = False,
    ) -> None:
        if cuda_graph and compile:
            raise ValueError("cuda_graph captures the eager decode step; compile=True already replays "
                             "CUDA graphs (mode='reduce-overhead'): choose one")
        if compile:
            # NOTE: plain inner tensors instead of weight subclasses at the compiled call: the
            # per-call subclass flattening cost ~3 ms per decode step on Llama-2-7B (H100, W4A8:
            # 2.5 ms of GPU work per step, 5.4 ms wall; results/profile_decode_w4a8_subclass_h100.txt).
            from lowbit.api import flatten_quantized_linears

            flatten_quantized_linears(model)
        self.model = model
        self.sampling = sampling
        self.compiled = compile
        self.compile_mode = compile_mode
        self.cuda_graph = cuda_graph
        self.graph_prefill = (compile or cuda_graph) if graph_prefill is None else graph_prefill
        self._prefill_graphs: dict[tuple[int, int], _PrefillGraph | None] = {}
        self._decode_graphs: dict[tuple[int, float, int | None], _DecodeGraph | None] = {}
        self.decode_graphed = False  # did the last decode step replay a captured graph?
        if cuda_graph and model.device.type != "cuda":
            warnings.warn(f"cuda_graph has no effect on {model.device.type}: decode runs eagerly",
                          stacklevel=2)
        self._graph_pool: Any = None
        self._graphs_version = model.cache_version
        self._step = (
            torch.compile(decode_step, mode=compile_mode, fullgraph=True, dynamic=False)
            if compile
            else decode_step
        )

    def check(self, prompt: torch.Tensor, max_new_tokens: int) -> None:
        m = self.model
        if prompt.dim() != 2 or prompt.dtype != torch.long:
            raise ValueError(
                f"prompt must be a (batch, length) int64 tensor, got {tuple(prompt.shape)} {prompt.dtype}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        b, t = prompt.shape
        if t < 1:
            raise ValueError("prompt is empty")
        if m.cache_len == 0:
            raise ValueError("no KV cache: call model.setup_caches(batch, max_seq_len) first")
        if b != m.cache_batch:
            raise ValueError(f"prompt batch {b} != KV cache batch {m.cache_batch}")
        if t + max_new_tokens > m.cache_len:
            raise ValueError(
                f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{t + max_new_tokens} exceeds the KV cache length {m.cache_len} "
                "(raise --max-seq-len)"
            )
        lo, hi = int(prompt.min()), int(prompt.max())
        if lo < 0 or hi >= m.args.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {m.args.vocab_size}), got [{lo}, {hi}]")

    def graphs_prefill(self, prompt: torch.Tensor) -> bool:
        """True when this prompt's prefill runs as a CUDA-graph replay."""
        t = prompt.shape[1]
        return (self.graph_prefill and prompt.is_cuda and t <= GRAPH_PREFILL_MAX
                and prefill_bucket(t) <= self.model.cache_len and not torch.is_grad_enabled())

    def _prefill_graph(self, prompt: torch.Tensor) -> _PrefillGraph | None:
        """The captured prefill for this prompt's (batch, bucket), capturing it on first use; None
        (eager prefill) when capture failed for that key. Graphs hold the KV cache buffers they
        were captured with: new caches (setup_caches) drop them."""
        self._check_graphs_version()
        key = (prompt.shape[0], prefill_bucket(prompt.shape[1]))
        if key not in self._prefill_graphs:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            try:
                self._prefill_graphs[key] = _PrefillGraph(self.model, key[0], key[1], prompt.device,
                                                          self._graph_pool)
            except RuntimeError as e:  # a kernel that cannot be captured: stay eager for this key
                warnings.warn(f"CUDA-graph prefill unavailable for batch {key[0]} x {key[1]} tokens, "
                              f"prefill runs eagerly: {_capture_error(e)}", stacklevel=3)
                self._prefill_graphs[key] = None
        return self._prefill_graphs[key]

    def _check_graphs_version(self) -> None:
        if self._graphs_version != self.model.cache_version:
            self._prefill_graphs.clear()
            self._decode_graphs.clear()
            # NOTE: a fresh pool for the new graphs: capturing into the pool of graphs just freed
            # failed an allocator assertion (torch 2.11, `use_count > 0`, CUDACachingAllocator).
            self._graph_pool = None
            self._graphs_version = self.model.cache_version

    def _decode(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step: the captured eager step (cuda_graph) or self._step."""
        if self.cuda_graph and tok.is_cuda and not torch.is_grad_enabled():
            self._check_graphs_version()
            # the sampling settings are baked into the graph: part of the key
            key = (tok.shape[0], self.sampling.temperature, self.sampling.top_k)
            if key not in self._decode_graphs:
                try:
                    self._decode_graphs[key] = _DecodeGraph(self.model, tok, pos, self.sampling)
                except RuntimeError as e:  # a kernel that cannot be captured: stay eager
                    warnings.warn(f"CUDA-graph decode unavailable for batch {key[0]}, decode runs eagerly: "
                                  f"{_capture_error(e)}", stacklevel=3)
                    self._decode_graphs[key] = None
            graph = self._decode_graphs[key]
            if graph is not None:
                self.decode_graphed = True
                return graph(tok, pos)
        self.decode_graphed = False
        return self._step(self.model, tok, pos, self.sampling.temperature, self.sampling.top_k)

    def _prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        graph = None
        if self.graphs_prefill(prompt):
            graph = self._prefill_graph(prompt)
        if graph is not None:
            logits = graph(prompt)
        else:
            pos = torch.arange(prompt.shape[1], device=prompt.device)
            with use_phase(self.model, Phase.PREFILL):
                logits = self.model(prompt, pos, prefill=True, last_only=True)
        return sample(logits[:, -1], self.sampling.temperature, self.sampling.top_k)

    def warmup(self, prompt: torch.Tensor, decode_steps: int = 3) -> float:
        """One prefill and `decode_steps` decode steps (compile, CUDA-graph recording, autotuning)
        before anything is timed. Returns the seconds the decode steps took (= compile time
        when compiled). Leaves stale cache entries that the next prefill overwrites."""
        device = prompt.device
        with torch.no_grad():
            self._prefill(prompt)
            synchronize(device)
            t0 = time.perf_counter()
            tok = prompt[:, :1].clone()
            pos = torch.zeros(1, dtype=torch.long, device=device)
            with use_phase(self.model, Phase.DECODE):
                for _ in range(decode_steps):
                    tok = self._decode(tok, pos).clone()
            synchronize(device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> GenerationResult:
        self.check(prompt, max_new_tokens)
        device = prompt.device
        b, t = prompt.shape
        out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=device)
        out[:, :t] = prompt
        synchronize(device)
        t0 = time.perf_counter()
        tok = self._prefill(prompt)
        out[:, t] = tok[:, 0]
        synchronize(device)
        t1 = time.perf_counter()
        pos = torch.full((1,), t, dtype=torch.long, device=device)
        with use_phase(self.model, Phase.DECODE):
            for i in range(1, max_new_tokens):
                # clone: a CUDA-graph output buffer is overwritten by the next replay
                tok = self._decode(tok, pos).clone()
                out[:, t + i] = tok[:, 0]
                pos += 1
        synchronize(device)
        t2 = time.perf_counter()
        return GenerationResult(out, t, max_new_tokens, t1 - t0, t2 - t1)
