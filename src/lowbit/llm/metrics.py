"""What the harness reports besides timings: stored model bytes, peak memory, versions."""

from __future__ import annotations

import platform
import resource
import sys
from dataclasses import dataclass
from importlib import metadata

import torch
from torch import nn

from lowbit.llm.model import KVCache

GB = 1e9


def stored_nbytes(t: torch.Tensor, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes a tensor occupies as stored: a tensor subclass (lowbit, torchao) counts its inner
    tensors; storage shared between tensors is counted once when `seen` is passed."""
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_nbytes(getattr(t, n), seen) for n in names)
    n = t.numel() * t.element_size()
    if seen is not None:
        key = (t.data_ptr(), n) if t.device.type != "meta" else (id(t), n)
        if key in seen:
            return 0
        seen.add(key)
    return n


@dataclass
class ModelSize:
    total_bytes: int  # parameters + persistent buffers, as stored
    embedding_bytes: int  # the input embedding table (decode reads one row of it per token)
    kv_cache_bytes: int

    @property
    def read_per_step_bytes(self) -> int:
        """Weight bytes one decode step reads: everything but the input embedding table
        (when the table is tied to the output layer it is read there, and counted once)."""
        return self.total_bytes - self.embedding_bytes


def model_size(model: nn.Module) -> ModelSize:
    seen: set[tuple[int, int]] = set()
    kv = sum(stored_nbytes(b) for m in model.modules() if isinstance(m, KVCache) for b in m.buffers())
    total = 0
    emb = getattr(model, "tok_embeddings", None)
    emb_w = emb.weight if isinstance(emb, nn.Embedding) else None
    out = getattr(model, "output", None)
    tied = emb_w is not None and out is not None and getattr(out, "weight", None) is emb_w
    emb_bytes = stored_nbytes(emb_w) if emb_w is not None and not tied else 0
    for p in model.parameters():
        total += stored_nbytes(p, seen)
    persistent = {
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        for b in m._buffers
        if b not in m._non_persistent_buffers_set
    }
    for name, b in model.named_buffers():
        if name in persistent:
            total += stored_nbytes(b, seen)
    return ModelSize(total, emb_bytes, kv)


class MemoryMeter:
    """Peak memory between `reset()` and `read()`.

    CUDA: torch.cuda.max_memory_allocated / max_memory_reserved on the model's device.
    CPU: the process peak resident set size (ru_maxrss) -- it never resets, so it covers the
    whole process lifetime, not just the interval.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float | str | None]:
        if self.device.type == "cuda":
            return {
                "kind": "cuda max_memory_allocated / max_memory_reserved",
                "allocated_gb": torch.cuda.max_memory_allocated(self.device) / GB,
                "reserved_gb": torch.cuda.max_memory_reserved(self.device) / GB,
            }
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        rss = rss_kb * (1 if sys.platform == "darwin" else 1024)
        return {
            "kind": "process peak RSS (CPU; whole process lifetime)",
            "allocated_gb": None,
            "reserved_gb": None,
            "rss_gb": rss / GB,
        }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions without importing triton/transformers (metadata only)."""
    import lowbit

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "torchao": _version("torchao"),
        "lowbit": lowbit.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"
