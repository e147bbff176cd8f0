"""Captured (CUDA-graph) prefill of short prompts: right padding to a bucket, the last real token
selected on the device, one graph per (batch, bucket), recaptured when the caches change.

CPU: the padding / selection math (the graph itself needs CUDA); GPU: the generator end to end.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.llm import Generator, ModelArgs, RandomWeights, build_model
from lowbit.llm.generate import GRAPH_PREFILL_MAX, prefill_bucket
from lowbit.llm.loading import NoQuantizer

ON_GPU = torch.cuda.is_available()
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=300, head_dim=16)


def _model(device: str, dtype: torch.dtype = torch.float32):
    return build_model(ARGS, RandomWeights(ARGS, seed=5, std=0.2), NoQuantizer(), device, dtype)


def test_prefill_bucket():
    got = [prefill_bucket(t) for t in (1, 15, 16, 17, 32, 33, 300, 512)]
    assert got == [16, 16, 16, 32, 32, 64, 512, 512]


def test_right_padded_prompt_with_selected_position_matches_the_prompt_alone():
    """What the captured prefill computes: the padded prompt's logits at select = t - 1 equal the
    unpadded prompt's last logits, and the cache holds the same entries for positions < t."""
    model = _model("cpu")
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    padded = torch.zeros(2, 16, dtype=torch.long)
    padded[:, :11] = ids
    with torch.no_grad():
        model.setup_caches(2, 32)
        want = model(ids, torch.arange(11), prefill=True, last_only=True)
        k_want = model.layers[0].attention.kv_cache.k[:, :, :11].clone()
        model.setup_caches(2, 32)
        got = model(padded, torch.arange(16), prefill=True, select=torch.tensor([10]))
        k_got = model.layers[0].attention.kv_cache.k[:, :, :11]
    assert got.shape == want.shape == (2, 1, 300)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_got, k_want, rtol=1e-6, atol=1e-6)


def test_cpu_generator_prefills_eagerly():
    model = _model("cpu")
    model.setup_caches(1, 64)
    gen = Generator(model, graph_prefill=True)
    prompt = torch.randint(0, 300, (1, 9))
    assert not gen.graphs_prefill(prompt)
    assert gen.generate(prompt, 3).tokens.shape == (1, 12)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
def test_graphed_prefill_gives_the_eager_tokens():
    model = _model("cuda", torch.bfloat16)
    prompts = [torch.randint(0, 300, (2, t), device="cuda") for t in (5, 13, 16, 40)]
    model.setup_caches(2, 96)
    eager = [Generator(model, graph_prefill=False).generate(p, 12).tokens for p in prompts]
    gen = Generator(model, graph_prefill=True)
    with torch.no_grad():
        assert all(gen.graphs_prefill(p) for p in prompts)
    got = [gen.generate(p, 12).tokens for p in prompts]
    assert sorted(gen._prefill_graphs) == [(2, 16), (2, 64)]  # 5, 13, 16 share the 16-token graph
    for g, e in zip(got, eager):
        assert torch.equal(g, e)
    # new caches: the captured graphs held the old buffers and are dropped, then recaptured
    model.setup_caches(2, 96)
    again = gen.generate(prompts[1], 12).tokens
    assert torch.equal(again, eager[1]) and sorted(gen._prefill_graphs) == [(2, 16)]
    # too long for a graph, or for the bucket to fit the cache: eager
    with torch.no_grad():
        assert not gen.graphs_prefill(torch.zeros(2, GRAPH_PREFILL_MAX + 1, dtype=torch.long, device="cuda"))
        model.setup_caches(2, 50)
        assert not gen.graphs_prefill(prompts[3])  # bucket 64 > cache 50
