"""The decoder itself: KV-cache paths vs a cache-free forward (GQA), batching, sampling, presets."""

from __future__ import annotations

import pytest
import torch

from lowbit.llm import PRESETS, Generator, ModelArgs, RandomWeights, Sampling, build_model, sample
from lowbit.llm.loading import NoQuantizer


def _model(n_heads: int, n_kv: int, seed: int = 0) -> torch.nn.Module:
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=96, vocab_size=300, head_dim=16
    )
    # std 0.2: large enough that logits are far from ties
    return build_model(args, RandomWeights(args, seed=seed, std=0.2), NoQuantizer(), "cpu", torch.float32)


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (4, 1)])
def test_cache_paths_match_full_forward(n_heads, n_kv):
    """Prefill + single-token decode + a multi-token decode chunk through the KV cache give the
    logits of one cache-free causal forward (grouped-query attention with 1, 2, 4 heads per kv head)."""
    model = _model(n_heads, n_kv)
    ids = torch.randint(0, 300, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        model.setup_caches(2, 20)
        pre = model(ids[:, :8], torch.arange(8), prefill=True)
        step = model(ids[:, 8:9], torch.tensor([8]))
        chunk = model(ids[:, 9:14], torch.arange(9, 14))
    torch.testing.assert_close(pre, full[:, :8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, full[:, 8:9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 9:14], rtol=1e-5, atol=1e-5)


def test_batch_generation_equals_one_by_one():
    model = _model(4, 2)
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    model.setup_caches(3, 20)
    together = Generator(model).generate(ids, 8).tokens
    assert not torch.equal(together[0], together[1])  # different prompts, different outputs
    model.setup_caches(1, 20)
    for b in range(3):
        alone = Generator(model).generate(ids[b : b + 1], 8).tokens
        assert torch.equal(alone[0], together[b])


def test_top_k_sampling_is_reproducible_with_a_seed():
    model = _model(4, 2)
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(2))
    model.setup_caches(2, 40)
    gen = Generator(model, Sampling(temperature=1.0, top_k=20))

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return gen.generate(ids, 30).tokens

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    greedy = Generator(model).generate(ids, 30).tokens
    assert not torch.equal(a, greedy)


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    allowed = logits.topk(5, dim=-1).indices
    torch.manual_seed(0)
    for _ in range(50):
        tok = sample(logits, 1.5, 5)
        assert tok.shape == (4, 1)
        assert bool((allowed == tok).any(dim=-1).all())
    assert torch.equal(sample(logits, 0.0, None), logits.argmax(-1, keepdim=True))


def test_bad_sampling_and_cache_inputs_raise():
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(top_k=0)
    model = _model(4, 2)
    model.setup_caches(1, 10)
    gen = Generator(model)
    with pytest.raises(ValueError, match="exceeds the KV cache length 10"):
        gen.generate(torch.zeros(1, 8, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="batch 2 != KV cache batch 1"):
        gen.generate(torch.zeros(2, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="token ids must lie in"):
        gen.generate(torch.full((1, 4), 300, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8, vocab_size=10)


@pytest.mark.parametrize(
    "name,billions",
    [("llama-2-7b", 6.74), ("llama-2-13b", 13.02), ("llama-3-8b", 8.03), ("llama-3-70b", 70.55)],
)
def test_presets_have_the_published_parameter_counts(name, billions):
    assert PRESETS[name].num_params() / 1e9 == pytest.approx(billions, abs=0.01)
