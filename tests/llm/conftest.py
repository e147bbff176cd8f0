"""Tiny Hugging Face Llama checkpoints written with transformers, shared by the LLM tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# initializer_range 0.2 spreads the logits of the random model so greedy ties are unlikely.
TINY_HF = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def save_tiny_hf(directory, max_shard_size: str | None = None, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_HF, **overrides})).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a busy 2-core machine every op
    otherwise waits for a descheduled OpenMP worker (measured: tiny int4 load 7.5 s -> 0.65 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_hf_factory():
    """save_tiny_hf(directory, max_shard_size=None, **LlamaConfig overrides) -> transformers model."""
    return save_tiny_hf


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(directory, transformers model): a GQA checkpoint saved as 3 safetensors shards + index."""
    d = tmp_path_factory.mktemp("hf_tiny")
    model = save_tiny_hf(d, max_shard_size="200KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d, model
