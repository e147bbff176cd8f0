"""Eager decode step captured in a CUDA graph without torch.compile (Generator(cuda_graph=True),
`lowbit generate --cuda-graph`).

CPU: the option is refused with compile, a warned no-op off CUDA (same tokens as plain eager),
and the CLI records both the request and what ran. GPU: the eager greedy tokens for bf16 and
W4A8 weights at batch 1, 3 and 16; replays without recapturing; recaptures after new caches and
after new RoPE tables; warm-up then generate (the harness path); no decode steps; prompts in two
prefill buckets and one too long for a prefill graph; sampling in the graph (seeded, keyed on
the sampling settings); a capture that fails warns with its cause, decodes eagerly and leaves
the default stream current.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.llm import Generator, ModelArgs, RandomWeights, Sampling, build_model
from lowbit.llm.generate import GRAPH_PREFILL_MAX
from lowbit.llm.loading import NoQuantizer, make_quantizer

ON_GPU = torch.cuda.is_available()
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=300, head_dim=32)
gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")


def _model(device: str, dtype: torch.dtype = torch.float32, quantizer=None):
    return build_model(ARGS, RandomWeights(ARGS, seed=5, std=0.2), quantizer or NoQuantizer(), device, dtype)


def _eager(model, prompt, new, max_seq=64):
    model.setup_caches(prompt.shape[0], max_seq)
    return Generator(model).generate(prompt, new).tokens


def test_cuda_graph_with_compile_is_refused():
    with pytest.raises(ValueError, match="choose one"):
        Generator(_model("cpu"), compile=True, cuda_graph=True)


def test_cpu_generator_with_cuda_graph_decodes_eagerly():
    model = _model("cpu")
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    want = _eager(model, prompt, 6, 32)
    model.setup_caches(2, 32)
    with pytest.warns(UserWarning, match="no effect on cpu"):
        gen = Generator(model, cuda_graph=True)
    got = gen.generate(prompt, 6).tokens
    assert torch.equal(got, want) and gen._decode_graphs == {} and not gen.decode_graphed


def test_cli_records_cuda_graph(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "r.json"
    rc = main(["generate", "--model", "tiny", "--random-weights", "--device", "cpu", "--prompt-len", "5",
               "--max-new-tokens", "3", "--cuda-graph", "--json-out", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())
    assert row["cuda_graph"] is True and row["cuda_graph_replayed"] is False  # CPU: requested, not run
    assert "NOT replayed" in capsys.readouterr().out
    rc = main(["generate", "--model", "tiny", "--random-weights", "--device", "cpu", "--cuda-graph",
               "--compile"])
    assert rc == 1 and "choose one" in capsys.readouterr().err


def test_cli_default_cuda_graph_only_for_one_uncompiled_gpu(tmp_path):
    from lowbit.cli import main
    from lowbit.commands.generate import default_cuda_graph

    assert default_cuda_graph(None, "cuda", False, 1) is True
    assert default_cuda_graph(None, torch.device("cuda", 1), False, 1) is True
    assert default_cuda_graph(None, "cpu", False, 1) is False
    assert default_cuda_graph(None, "cuda", True, 1) is False  # --compile replays its own graphs
    assert default_cuda_graph(None, "cuda", False, 2) is False  # --tp: not measured inside graphs
    assert default_cuda_graph(False, "cuda", False, 1) is False  # --no-cuda-graph
    assert default_cuda_graph(True, "cuda", False, 2) is True
    out = tmp_path / "r.json"
    assert main(["generate", "--model", "tiny", "--random-weights", "--device", "cpu", "--prompt-len", "5",
                 "--max-new-tokens", "2", "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["cuda_graph"] is False  # CPU default: eager


@gpu
def test_cli_default_replays_the_decode_graph_on_gpu(tmp_path):
    from lowbit.cli import main

    runs = {}
    for flag in ([], ["--no-cuda-graph"]):
        out = tmp_path / f"r{len(runs)}.json"
        assert main(["generate", "--model", "tiny", "--random-weights", "--device", "cuda", "--quant", "w4a8",
                     "--prompt-len", "5", "--max-new-tokens", "4", "--json-out", str(out), *flag]) == 0
        runs[tuple(flag)] = json.loads(out.read_text())
    assert runs[()]["cuda_graph"] is True and runs[()]["cuda_graph_replayed"] is True
    assert runs[("--no-cuda-graph",)]["cuda_graph"] is False
    assert runs[("--no-cuda-graph",)]["cuda_graph_replayed"] is False


@gpu
@pytest.mark.parametrize("fmt", ["bf16", "w4a8"])
def test_graphed_decode_gives_the_eager_tokens(fmt):
    quantizer = make_quantizer("w4a8", group_size=0) if fmt == "w4a8" else None
    model = _model("cuda", torch.bfloat16, quantizer)
    prompts = [torch.randint(0, 300, (b, 9), device="cuda") for b in (1, 3, 16)]
    want = [_eager(model, p, 20) for p in prompts]
    gen = Generator(model, cuda_graph=True)
    for p, w in zip(prompts, want):
        b = p.shape[0]
        model.setup_caches(b, 64)
        assert torch.equal(gen.generate(p, 20).tokens, w) and gen.decode_graphed
        assert list(gen._decode_graphs) == [(b, 0.0, None)]  # new caches dropped the previous graphs
        g = gen._decode_graphs[(b, 0.0, None)]
        assert g is not None
        assert torch.equal(gen.generate(p, 20).tokens, w)
        assert gen._decode_graphs[(b, 0.0, None)] is g  # replayed, not recaptured
    # new caches at the same batch size: recaptured, same tokens
    model.setup_caches(3, 64)
    assert torch.equal(gen.generate(prompts[1], 20).tokens, want[1])
    assert gen._decode_graphs[(3, 0.0, None)] is not g


@gpu
def test_warmup_then_generate_and_no_decode_steps():
    model = _model("cuda", torch.bfloat16)
    p = torch.randint(0, 300, (2, 11), device="cuda")
    want = _eager(model, p, 15)
    model.setup_caches(2, 64)
    gen = Generator(model, cuda_graph=True)
    gen.warmup(p)  # captures at the warm-up's position 0, then the timed run replays
    assert torch.equal(gen.generate(p, 15).tokens, want)
    assert torch.equal(gen.generate(p, 1).tokens, want[:, :12])  # prefill only


@gpu
def test_prefill_buckets_and_a_long_prompt_with_graphed_decode():
    model = _model("cuda", torch.bfloat16)
    prompts = [torch.randint(0, 300, (1, t), device="cuda") for t in (5, 40, GRAPH_PREFILL_MAX + 8)]
    want = [_eager(model, p, 10, GRAPH_PREFILL_MAX + 32) for p in prompts]
    model.setup_caches(1, GRAPH_PREFILL_MAX + 32)
    gen = Generator(model, cuda_graph=True)
    for p, w in zip(prompts, want):
        assert torch.equal(gen.generate(p, 10).tokens, w)
    assert sorted(gen._prefill_graphs) == [(1, 16), (1, 64)]  # the long prompt prefilled eagerly


@gpu
def test_new_rope_tables_drop_the_graphs():
    model = _model("cuda", torch.bfloat16)
    p = torch.randint(0, 300, (1, 9), device="cuda")
    want = _eager(model, p, 12)
    model.setup_caches(1, 64)
    gen = Generator(model, cuda_graph=True)
    assert torch.equal(gen.generate(p, 12).tokens, want)
    version = model.cache_version
    with torch.no_grad():  # a cache-free forward longer than the tables (a perplexity window)
        model(torch.randint(0, 300, (1, 200), device="cuda"))  # rebuilds them; the caches stay
        junk = [torch.randn(4096, device="cuda") for _ in range(8)]  # reuse the freed memory
    assert model.cache_version == version + 1 and model.cache_len == 64
    assert torch.equal(gen.generate(p, 12).tokens, want)
    del junk


@gpu
def test_graphed_decode_samples_with_temperature():
    model = _model("cuda", torch.bfloat16)
    p = torch.randint(0, 300, (2, 5), device="cuda")
    greedy = _eager(model, p, 30)
    model.setup_caches(2, 64)
    gen = Generator(model, Sampling(temperature=1.0, top_k=20), cuda_graph=True)
    gen.generate(p, 30)  # captures: its eager warm-up steps draw random numbers too
    torch.manual_seed(7)
    a = gen.generate(p, 30).tokens
    b = gen.generate(p, 30).tokens
    torch.manual_seed(7)
    c = gen.generate(p, 30).tokens
    assert gen._decode_graphs[(2, 1.0, 20)] is not None
    assert not torch.equal(a, greedy) and not torch.equal(a, b) and torch.equal(a, c)
    gen.sampling = Sampling()  # new settings: their own graph, greedy again
    assert torch.equal(gen.generate(p, 30).tokens, greedy) and (2, 0.0, None) in gen._decode_graphs


@gpu
def test_a_failed_capture_warns_with_its_cause_and_decodes_eagerly(monkeypatch):
    import lowbit.llm.generate as G

    model = _model("cuda", torch.bfloat16)
    p = torch.randint(0, 300, (1, 9), device="cuda")
    want = _eager(model, p, 8)
    real = G.decode_step

    def syncing_step(*args):
        out = real(*args)
        out.sum().item()  # a host sync: not capturable
        return out

    monkeypatch.setattr(G, "decode_step", syncing_step)
    model.setup_caches(1, 64)
    gen = Generator(model, cuda_graph=True, graph_prefill=False)
    with pytest.warns(UserWarning, match="decode runs eagerly: .*[Ee]rror"):
        got = gen.generate(p, 8).tokens
    assert torch.equal(got, want) and gen._decode_graphs == {(1, 0.0, None): None} and not gen.decode_graphed
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randint(0, 10, (4,), device="cuda")  # the RNG still works after the failed capture
    torch.randn(4, device="cuda").exponential_()
