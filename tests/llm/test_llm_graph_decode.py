"""Eager decode step captured in a CUDA graph without torch.compile (Generator(cuda_graph=True),
`lowbit generate --cuda-graph`).

CPU: the option is refused with compile, ignored off CUDA (same tokens as plain eager), and the
CLI records it. GPU: the same greedy tokens as eager, for bf16 and W4A8 weights, one graph per
batch size, recaptured when the caches change; temperature sampling runs in the graph too.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.llm import Generator, ModelArgs, RandomWeights, build_model
from lowbit.llm.loading import NoQuantizer, make_quantizer

ON_GPU = torch.cuda.is_available()
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=300, head_dim=32)


def _model(device: str, dtype: torch.dtype = torch.float32, quantizer=None):
    return build_model(ARGS, RandomWeights(ARGS, seed=5, std=0.2), quantizer or NoQuantizer(), device, dtype)


def test_cuda_graph_with_compile_is_refused():
    with pytest.raises(ValueError, match="choose one"):
        Generator(_model("cpu"), compile=True, cuda_graph=True)


def test_cpu_generator_with_cuda_graph_decodes_eagerly():
    model = _model("cpu")
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    model.setup_caches(2, 32)
    want = Generator(model).generate(prompt, 6).tokens
    model.setup_caches(2, 32)
    gen = Generator(model, cuda_graph=True)
    got = gen.generate(prompt, 6).tokens
    assert torch.equal(got, want) and gen._decode_graphs == {}


def test_cli_records_cuda_graph(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "r.json"
    rc = main(["generate", "--model", "tiny", "--random-weights", "--device", "cpu", "--prompt-len", "5",
               "--max-new-tokens", "3", "--cuda-graph", "--json-out", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["cuda_graph"] is True
    capsys.readouterr()
    rc = main(["generate", "--model", "tiny", "--random-weights", "--device", "cpu", "--cuda-graph",
               "--compile"])
    assert rc == 1 and "choose one" in capsys.readouterr().err


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("fmt", ["bf16", "w4a8"])
def test_graphed_decode_gives_the_eager_tokens(fmt):
    quantizer = make_quantizer("w4a8", group_size=0) if fmt == "w4a8" else None
    model = _model("cuda", torch.bfloat16, quantizer)
    prompts = [torch.randint(0, 300, (b, 9), device="cuda") for b in (1, 3)]
    model.setup_caches(3, 64)
    want = []
    for p in prompts:
        model.setup_caches(p.shape[0], 64)
        want.append(Generator(model).generate(p, 20).tokens)
    gen = Generator(model, cuda_graph=True)
    for p, w in zip(prompts, want):
        model.setup_caches(p.shape[0], 64)
        got = gen.generate(p, 20).tokens
        assert torch.equal(got, w)
        assert sorted(gen._decode_graphs) == [p.shape[0]]  # new caches drop the previous graphs
        again = gen.generate(p, 20).tokens  # replayed, not recaptured
        assert torch.equal(again, w) and gen._decode_graphs[p.shape[0]] is not None


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
def test_graphed_decode_samples_with_temperature():
    from lowbit.llm import Sampling

    model = _model("cuda", torch.bfloat16)
    model.setup_caches(2, 64)
    gen = Generator(model, Sampling(temperature=1.0, top_k=20), cuda_graph=True)
    toks = gen.generate(torch.randint(0, 300, (2, 5), device="cuda"), 30).tokens
    assert gen._decode_graphs[2] is not None
    new = toks[:, 5:]
    assert ((new >= 0) & (new < 300)).all() and new.unique().numel() > 5  # sampled, not constant
