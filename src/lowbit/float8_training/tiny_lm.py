"""A small byte-level decoder and a training loop for float8 convergence checks on CPU.

The text is Python's own help corpus (`pydoc_data.topics`, ~0.8 MB of English and code, shipped
with CPython), read as bytes: vocabulary 256, no tokenizer, nothing to download. Runs compare a
high-precision model with float8 copies of the same initial weights trained on the same batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


@dataclass(frozen=True)
class TinyLMConfig:
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 1024
    seq_len: int = 128
    vocab: int = 256


class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention, then a GELU MLP."""

    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))


def load_text_bytes() -> torch.Tensor:
    """The pydoc topics corpus as a uint8 tensor (deterministic order: sorted topic names)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def split(data: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = int(len(data) * val_fraction)
    return data[:-n_val], data[-n_val:]


def sample_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq_len + 1) int64 windows at random offsets: inputs are [:, :-1], targets [:, 1:]."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()


def lm_loss(model: TinyLM, window: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    logits = model(window[:, :-1], checkpoint=checkpoint)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: TinyLM, val: torch.Tensor, batches: int, batch: int, seq_len: int) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same held-out windows for every run
    losses = [lm_loss(model, sample_batch(val, batch, seq_len, gen)).item() for _ in range(batches)]
    return sum(losses) / len(losses)


@dataclass
class TrainResult:
    losses: list[float]
    val_loss: float
    seconds: float


def train(
    model: TinyLM,
    data: torch.Tensor,
    steps: int,
    batch: int = 16,
    lr: float = 2e-3,
    warmup: int = 20,
    seed: int = 0,
    val_batches: int = 8,
    log: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """AdamW with linear warmup and cosine decay; the batch sequence depends only on `seed`."""
    train_data, val_data = split(data)
    seq_len = model.cfg.seq_len
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = lm_loss(model, sample_batch(train_data, batch, seq_len, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(losses, evaluate(model, val_data, val_batches, batch, seq_len), seconds)
