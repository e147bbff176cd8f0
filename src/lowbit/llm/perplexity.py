"""Sliding-window perplexity (the Hugging Face recipe, with exact token accounting).

Windows of `seq_len` tokens start every `stride` tokens; each window is a fresh forward
pass (no KV cache) and scores only the tokens the previous window did not, each with the
context available inside its window. A token is never scored twice; it is left out only when
it opens its window with nothing before it (the first token of the text, and with
stride == seq_len the first token of every window, exactly as the HF recipe does). With
seq_len >= len(text) this is exp(mean next-token NLL) of one forward pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.llm.model import Transformer
from lowbit.llm.phased import Phase, use_phase

LOGIT_CHUNK = 1024  # positions per lm_head + cross-entropy chunk: bounds the (T, vocab) logits


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    scored_tokens: int
    windows: int
    seconds: float


def _window_nll(model: Transformer, window: torch.Tensor, first_scored: int) -> tuple[float, int]:
    """Sum of -log p(window[j] | window[:j]) over j >= max(first_scored, 1)."""
    hidden = model.hidden_states(window[None])[0]  # (T, dim)
    start = max(first_scored, 1)
    total, count = 0.0, 0
    for lo in range(start, window.shape[0], LOGIT_CHUNK):
        hi = min(lo + LOGIT_CHUNK, window.shape[0])
        logits = model.output(hidden[lo - 1 : hi - 1]).float()
        total += float(F.cross_entropy(logits, window[lo:hi], reduction="sum").double())
        count += hi - lo
    return total, count


@torch.no_grad()
def perplexity(
    model: Transformer, ids: torch.Tensor, seq_len: int = 2048, stride: int | None = None
) -> PerplexityResult:
    """Perplexity of the 1-D token tensor `ids` (on the model's device)."""
    stride = seq_len if stride is None else stride
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"perplexity needs a 1-D sequence of >= 2 tokens, got shape {tuple(ids.shape)}")
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(
            f"need seq_len >= 2 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}"
        )
    n = ids.numel()
    t0 = time.perf_counter()
    nll, count, windows, prev_end = 0.0, 0, 0, 0
    with use_phase(model, Phase.PREFILL):
        for begin in range(0, n, stride):
            end = min(begin + seq_len, n)
            window = ids[begin:end]
            s, c = _window_nll(model, window, prev_end - begin)
            nll, count, windows = nll + s, count + c, windows + 1
            prev_end = end
            if end == n:
                break
    return PerplexityResult(math.exp(nll / count), nll, count, windows, time.perf_counter() - t0)
