"""The decoder's eager fast path (fused RMSNorm / RoPE / SwiGLU, W4A8 activations quantized by
the norm and SwiGLU kernels) against the plain eager ops, on the same model.

CPU: Triton's interpreter with LOWBIT_FUSED=1 (fp16); on a GPU the fast path is the default.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.formats.configs import Int8DynamicActivationInt4WeightConfig
from lowbit.formats.int4 import Int4Tensor
from lowbit.kernels import fused, rope
from lowbit.llm import ModelArgs, RandomWeights, build_model
from lowbit.llm.loading import ConfigQuantizer, NoQuantizer
from lowbit.llm.phased import Phase, use_phase

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=300, head_dim=16)


def _model(quantizer):
    return build_model(ARGS, RandomWeights(ARGS, seed=3, std=0.2), quantizer, DEV, torch.float16)


def _prefill_logits(model, ids, monkeypatch, fused_mode: str) -> torch.Tensor:
    monkeypatch.setenv("LOWBIT_FUSED", fused_mode)
    model.setup_caches(ids.shape[0], ids.shape[1] + 4)
    with torch.no_grad(), use_phase(model, Phase.PREFILL):
        return model(ids, torch.arange(ids.shape[1], device=DEV), prefill=True).float()


def _count_calls(monkeypatch, owner, name: str) -> list[int]:
    calls = [0]
    real = getattr(owner, name)

    def spy(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_fused_bf16_path_matches_the_eager_ops(monkeypatch):
    model = _model(NoQuantizer())
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    want = _prefill_logits(model, ids, monkeypatch, "0")
    norms = _count_calls(monkeypatch, fused, "rms_norm")
    add_norms = _count_calls(monkeypatch, fused, "add_rms_norm")
    ropes = _count_calls(monkeypatch, rope, "rope_qk")
    glus = _count_calls(monkeypatch, fused, "swiglu")
    got = _prefill_logits(model, ids, monkeypatch, "1")
    # the first norm has no pending residual; every residual add is folded into the norm after it
    assert norms[0] == 1 and add_norms[0] == 2 * ARGS.n_layers
    assert ropes[0] == ARGS.n_layers and glus[0] == ARGS.n_layers
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_w4a8_prefill_takes_activations_quantized_by_norm_and_swiglu(monkeypatch):
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=None, kernel="triton")
    model = _model(ConfigQuantizer(cfg))
    assert isinstance(model.layers[0].feed_forward.w2.weight, Int4Tensor)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEV)  # 80 tokens
    want = _prefill_logits(model, ids, monkeypatch, "0")
    pre = _count_calls(monkeypatch, Int4Tensor, "linear_prequantized")
    got = _prefill_logits(model, ids, monkeypatch, "1")
    assert pre[0] == 3 * ARGS.n_layers  # wqkv and w13 from the norm kernel, w2 from SwiGLU
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    # 16 tokens run the int8 decode kernel, which takes the producers' int8 rows as well
    pre[0] = 0
    want16 = _prefill_logits(model, ids[:, :8], monkeypatch, "0")
    got16 = _prefill_logits(model, ids[:, :8], monkeypatch, "1")
    assert pre[0] == 3 * ARGS.n_layers
    torch.testing.assert_close(got16, want16, rtol=3e-2, atol=3e-2)
    # 2 x 2 tokens: the streaming dp4a GEMV quantizes in its own prologue (short rows)
    pre[0] = 0
    _prefill_logits(model, ids[:, :2], monkeypatch, "1")
    assert pre[0] == 0
    # the compiled decode loop flattens the linears: prefill keeps the fused quantization
    from lowbit.api import flatten_quantized_linears

    assert flatten_quantized_linears(model) > 0
    torch.testing.assert_close(_prefill_logits(model, ids, monkeypatch, "1"), got, rtol=0, atol=0)
    assert pre[0] == 3 * ARGS.n_layers


def test_one_token_long_row_takes_the_swiglu_quantization(monkeypatch):
    """One token into a per-row W4A8 weight with K > LONG_ROW_MIN_K (a Llama down projection): the
    SwiGLU kernel quantizes and gemv_q runs, as in the compiled step; the result equals the
    streaming GEMV's on the unquantized SwiGLU output exactly (it quantizes in its prologue to the
    same integers, same epilogue order). Group-wise weights (K a multiple of the group) and short
    rows keep the streaming GEMV."""
    from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a
    from lowbit.kernels.w4a8.op import LONG_ROW_MIN_K
    from lowbit.llm import fastpath

    monkeypatch.setenv("LOWBIT_FUSED", "1")
    dtype = torch.float16
    k = LONG_ROW_MIN_K + 128
    gen = torch.Generator().manual_seed(4)
    for group_size, in_k, takes in ((None, k, True), (128, k, False), (None, 256, False)):
        lin = torch.nn.Linear(in_k, 8, bias=False).to(DEV, dtype)
        cfg = Int8DynamicActivationInt4WeightConfig(group_size=group_size, kernel="triton")
        w = cfg.quantize_weight(lin.weight.detach())
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        gu = torch.randn(1, 1, 2 * in_k, generator=gen).to(DEV, dtype)
        pre = _count_calls(monkeypatch, Int4Tensor, "linear_prequantized")
        with torch.no_grad():
            assert lin.weight.takes_prequantized(gu[..., :in_k]) is takes
            got = fastpath.swiglu_linear(lin, gu)
            h = fastpath.swiglu(gu).reshape(1, in_k)
            want = w4a8_gemv_dp4a(h, w.qdata, w.scale, None, w.group_size, kernel="stream")
        assert pre[0] == int(takes)
        assert torch.equal(got.reshape(1, 8), want)
        monkeypatch.undo()
        monkeypatch.setenv("LOWBIT_FUSED", "1")


def test_decode_mlp_applies_swiglu_in_the_gate_up_gemv(monkeypatch):
    """A decode step (one token per sequence, batch 1 and 2) into W4A8 weights: the [gate; up]
    GEMV applies SwiGLU in its epilogue (linear_swiglu) in every block, and the logits equal the
    step that runs the GEMV, then the SwiGLU kernel, bit for bit."""
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=None, kernel="triton")
    model = _model(ConfigQuantizer(cfg))
    for batch in (1, 2):
        ids = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(5)).to(DEV)

        def step(ids=ids) -> torch.Tensor:
            _prefill_logits(model, ids, monkeypatch, "1")
            monkeypatch.setenv("LOWBIT_STREAM_NORM", "0")  # the norm kernel, then the GEMV (bit-exact chain)
            with torch.no_grad(), use_phase(model, Phase.DECODE):
                return model(ids[:, :1], torch.tensor([ids.shape[1]], device=DEV)).float()

        calls = _count_calls(monkeypatch, Int4Tensor, "linear_swiglu")
        got = step()
        assert calls[0] == ARGS.n_layers
        monkeypatch.setattr(Int4Tensor, "streams_paired", lambda self, x: False)
        glus = _count_calls(monkeypatch, fused, "swiglu")
        want = step()
        assert glus[0] == ARGS.n_layers and calls[0] == ARGS.n_layers
        assert torch.equal(got, want)
        monkeypatch.undo()


def _plain_qkv(norm, wqkv, x, delta, *rope_args):
    from lowbit.llm import fastpath

    return (*fastpath.add_norm_linear(norm, wqkv, x, delta), False)


@pytest.mark.parametrize("group_size", [None, 32])
def test_decode_qkv_gemv_rotates_and_writes_the_cache(monkeypatch, group_size):
    """A decode step (batch 1 and 2) into W4A8 weights: the [q; k; v] GEMV applies RoPE and writes
    k and v into the cache in its epilogue (linear_rope_cache) in every block, with no
    rope_cache kernel; the logits and both caches equal the step that runs the GEMV, then
    rope_cache_update, bit for bit."""
    from lowbit.llm import fastpath

    cfg = Int8DynamicActivationInt4WeightConfig(group_size=group_size, kernel="triton")
    model = _model(ConfigQuantizer(cfg))
    for batch in (1, 2):
        ids = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(7)).to(DEV)

        def step(ids=ids) -> tuple[torch.Tensor, list[torch.Tensor]]:
            _prefill_logits(model, ids, monkeypatch, "1")
            monkeypatch.setenv("LOWBIT_STREAM_NORM", "0")  # the norm kernel, then the GEMV (bit-exact chain)
            with torch.no_grad(), use_phase(model, Phase.DECODE):
                out = model(ids[:, :1], torch.tensor([ids.shape[1]], device=DEV)).float()
            kvs = [b.attention.kv_cache for b in model.blocks()]
            caches = [c.clone() for kv in kvs for c in (kv.k, kv.v)]
            return out, caches

        ropes = _count_calls(monkeypatch, Int4Tensor, "linear_rope_cache")
        chain = _count_calls(monkeypatch, rope, "rope_cache_update")
        got, got_caches = step()
        assert ropes[0] == ARGS.n_layers and chain[0] == 0
        monkeypatch.setattr(fastpath, "add_norm_qkv_rope", _plain_qkv)
        want, want_caches = step()
        assert chain[0] == ARGS.n_layers and ropes[0] == ARGS.n_layers
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(got_caches, want_caches))
        monkeypatch.undo()


@pytest.mark.parametrize("group_size", [None, 32])
def test_decode_folds_the_block_norms_into_the_streaming_gemvs(monkeypatch, group_size):
    """A decode step (batch 1 and 2) into W4A8 weights: both RMSNorms of every block run in the
    prologue of the GEMV after them (no norm kernel; the [q; k; v] and [gate; up] kernels get the
    residual stream and its update), and the logits stay within a few activation-quantization
    steps of the step with separate norm kernels (the kernel quantizes h * weight and applies
    1 / rms(h) after the dots; its arithmetic is checked in tests/kernels/test_gemv_stream_norm.py)."""
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=group_size, kernel="triton")
    model = _model(ConfigQuantizer(cfg))
    for batch in (1, 2):
        ids = torch.randint(0, 300, (batch, 5), generator=torch.Generator().manual_seed(9)).to(DEV)

        def step(fold: str, ids=ids) -> torch.Tensor:
            _prefill_logits(model, ids, monkeypatch, "1")
            monkeypatch.setenv("LOWBIT_STREAM_NORM", fold)
            with torch.no_grad(), use_phase(model, Phase.DECODE):
                return model(ids[:, :1], torch.tensor([ids.shape[1]], device=DEV)).float()

        norms = _count_calls(monkeypatch, fused, "add_rms_norm")
        plain_norms = _count_calls(monkeypatch, fused, "rms_norm")
        folded = [0]
        for name in ("linear_swiglu", "linear_rope_cache"):
            real = getattr(Int4Tensor, name)

            def spy(self, *a, real=real, folded=folded, **k):
                folded[0] += k.get("norm") is not None
                return real(self, *a, **k)

            monkeypatch.setattr(Int4Tensor, name, spy)
        want = step("0")
        separate = norms[0] + plain_norms[0]
        norms[0] = plain_norms[0] = 0
        got = step("1")
        assert folded[0] == 2 * ARGS.n_layers
        assert separate - (norms[0] + plain_norms[0]) == 2 * ARGS.n_layers
        assert (got - want).abs().max() <= 0.05 * want.abs().max()
        monkeypatch.undo()


def test_stream_norm_takes_only_a_matching_rmsnorm(monkeypatch):
    """fastpath._folded_norm (the fold of add + RMSNorm into the next streaming GEMV) takes lowbit's
    RMSNorm with a weight in x's dtype and a delta shaped like x, with contiguous h rows even for a
    permuted x; anything else (LayerNorm, a float32 weight, a broadcast delta, the switch off) keeps
    the norm kernel."""
    from lowbit.llm import fastpath
    from lowbit.llm.model import RMSNorm

    monkeypatch.setenv("LOWBIT_FUSED", "1")
    dim = 64
    x = torch.randn(2, 3, dim, device=DEV).half().transpose(0, 1)  # (3, 2, dim), not contiguous
    delta = torch.randn(3, 2, dim, device=DEV).half()
    norm = RMSNorm(dim, 1e-5).to(DEV, torch.float16)
    with torch.no_grad():
        folded = fastpath._folded_norm(norm, x, delta)
        assert folded is not None
        h, nin = folded
        assert h.shape == x.shape and h.is_contiguous() and nin.h_out.data_ptr() == h.data_ptr()
        assert nin.delta.shape == (6, dim) and nin.weight is norm.weight
        assert fastpath._folded_norm(norm, x, None)[0] is x
        assert fastpath._folded_norm(torch.nn.LayerNorm(dim).to(DEV, torch.float16), x, delta) is None
        assert fastpath._folded_norm(RMSNorm(dim, 1e-5).to(DEV), x, delta) is None  # float32 weight
        assert fastpath._folded_norm(norm, x, delta[:1]) is None
        monkeypatch.setenv("LOWBIT_STREAM_NORM", "0")
        assert fastpath._folded_norm(norm, x, delta) is None


def test_decode_qkv_falls_back_where_the_norm_output_cannot_stream(monkeypatch):
    """add_norm_qkv_rope: a float32 norm output (GPU half, as for add_norm_mlp) or a weight that
    does not stream gives (h, qkv, False), the add_norm_linear result; a step without a pending
    add rotates in the GEMV."""
    from lowbit.llm import fastpath
    from lowbit.llm.model import RMSNorm

    monkeypatch.setenv("LOWBIT_FUSED", "1")
    monkeypatch.setenv("LOWBIT_STREAM_NORM", "0")  # norm kernel + GEMV: the chains compared bit for bit
    dim, nq, nk, d, s = 64, 2, 1, 16, 6
    wqkv = torch.nn.Linear(dim, (nq + 2 * nk) * d, bias=False).to(DEV, torch.float16)
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=None, kernel="auto" if DEV == "cuda" else "triton")
    wqkv.weight = torch.nn.Parameter(cfg.quantize_weight(wqkv.weight.detach()), requires_grad=False)
    x = torch.randn(1, 1, dim, device=DEV).half()
    delta = torch.randn(1, 1, dim, device=DEV).half()
    cos = torch.randn(1, d, device=DEV).half()
    sin = torch.randn(1, d, device=DEV).half()
    pos = torch.tensor([3], device=DEV)
    kc = torch.zeros(1, nk, s, d, device=DEV).half()
    vc = torch.zeros_like(kc)
    calls = _count_calls(monkeypatch, Int4Tensor, "linear_rope_cache")
    with torch.no_grad():
        if DEV == "cuda":
            norm32 = RMSNorm(dim, 1e-5).to(DEV)  # float32 weight
            h, qkv, rotated = fastpath.add_norm_qkv_rope(norm32, wqkv, x, delta, nq, nk, d, cos, sin, pos, kc,
                                                         vc)
            h2, qkv2 = fastpath.add_norm_linear(norm32, wqkv, x, delta)
            assert not rotated and calls[0] == 0 and torch.equal(h, h2) and torch.equal(qkv, qkv2)
            assert not kc.any()
        norm = RMSNorm(dim, 1e-5).to(DEV, torch.float16)
        plain = torch.nn.Linear(dim, (nq + 2 * nk) * d, bias=False).to(DEV, torch.float16)
        h, qkv, rotated = fastpath.add_norm_qkv_rope(norm, plain, x, delta, nq, nk, d, cos, sin, pos, kc, vc)
        h2, qkv2 = fastpath.add_norm_linear(norm, plain, x, delta)
        assert not rotated and calls[0] == 0 and torch.equal(h, h2) and torch.equal(qkv, qkv2)
        h, q, rotated = fastpath.add_norm_qkv_rope(norm, wqkv, x, None, nq, nk, d, cos, sin, pos, kc, vc)
        assert rotated and calls[0] == 1 and h is x and q.shape == (1, nq, 1, d)
        kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
        want = fastpath.rope_cache(fastpath.norm_linear(norm, wqkv, x), nq, nk, d, cos, sin, pos, kc2, vc2)
        assert torch.equal(q, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2) and kc.any()


@pytest.mark.parametrize("group_size", [None, 32])
def test_swiglu_gemv_hands_a_long_row_its_int8_rows(monkeypatch, group_size):
    """One token, w2 with K > LONG_ROW_MIN_K per row (a Llama down projection): the SwiGLU GEMV's
    per-program absmaxes quantize its output for gemv_q (act_quant_from_amax), with the same
    result as the norm + GEMV + SwiGLU-with-quantization chain. Group-wise w2 keeps the
    streaming GEMV on the SwiGLU output."""
    from lowbit.kernels.w4a8 import act_quant as aq
    from lowbit.kernels.w4a8 import op
    from lowbit.llm import fastpath
    from lowbit.llm.model import RMSNorm

    monkeypatch.setenv("LOWBIT_FUSED", "1")
    monkeypatch.setenv("LOWBIT_STREAM_NORM", "0")  # norm kernel + GEMV: the chains compared bit for bit
    monkeypatch.setattr(op, "LONG_ROW_MIN_K", 192)  # the interpreter walks 8192-long rows slowly
    dtype, dim, f = torch.float16, 64, 224
    gen = torch.Generator().manual_seed(6)
    norm = RMSNorm(dim, 1e-5).to(DEV, dtype)
    w13 = torch.nn.Linear(dim, 2 * f, bias=False).to(DEV, dtype)
    w2 = torch.nn.Linear(f, 8, bias=False).to(DEV, dtype)
    for lin, g in ((w13, None), (w2, group_size)):
        cfg = Int8DynamicActivationInt4WeightConfig(group_size=g, kernel="triton")
        lin.weight = torch.nn.Parameter(cfg.quantize_weight(lin.weight.detach()), requires_grad=False)
    x = torch.randn(1, 1, dim, generator=gen).to(DEV, dtype)
    delta = torch.randn(1, 1, dim, generator=gen).to(DEV, dtype)
    amaxes = _count_calls(monkeypatch, aq, "act_quant_from_amax")
    with torch.no_grad():
        h, got = fastpath.add_norm_mlp(norm, w13, w2, x, delta)
        h2, gu = fastpath.add_norm_linear(norm, w13, x, delta)
        want = fastpath.swiglu_linear(w2, gu)
    assert amaxes[0] == int(group_size is None)
    assert torch.equal(h, h2) and torch.equal(got, want)


def test_decode_mlp_falls_back_where_the_norm_output_cannot_stream(monkeypatch):
    """A float32 norm weight on fp16 activations gives a float32 norm output, which the Triton
    W4A8 kernels do not take (AUTO runs the reference on it; on CPU AUTO is the reference anyway,
    so that half runs on a GPU): add_norm_mlp runs the plain chain, with the result of
    add_norm_linear + swiglu_linear, instead of failing. A step without a pending add takes the
    SwiGLU GEMV."""
    from lowbit.llm import fastpath
    from lowbit.llm.model import RMSNorm

    monkeypatch.setenv("LOWBIT_FUSED", "1")
    monkeypatch.setenv("LOWBIT_STREAM_NORM", "0")  # norm kernel + GEMV: the chains compared bit for bit
    dim, f = 64, 96
    w13 = torch.nn.Linear(dim, 2 * f, bias=False).to(DEV, torch.float16)
    w2 = torch.nn.Linear(f, dim, bias=False).to(DEV, torch.float16)
    cfg = Int8DynamicActivationInt4WeightConfig(group_size=None, kernel="auto" if DEV == "cuda" else "triton")
    for lin in (w13, w2):
        lin.weight = torch.nn.Parameter(cfg.quantize_weight(lin.weight.detach()), requires_grad=False)
    x = torch.randn(1, 1, dim, device=DEV).half()
    d = torch.randn(1, 1, dim, device=DEV).half()
    calls = _count_calls(monkeypatch, Int4Tensor, "linear_swiglu")
    with torch.no_grad():
        if DEV == "cuda":
            norm32 = RMSNorm(dim, 1e-5).to(DEV)  # float32 weight
            h, got = fastpath.add_norm_mlp(norm32, w13, w2, x, d)
            h2, gu = fastpath.add_norm_linear(norm32, w13, x, d)
            assert calls[0] == 0 and torch.equal(h, h2)
            assert torch.equal(got, fastpath.swiglu_linear(w2, gu))
        norm = RMSNorm(dim, 1e-5).to(DEV, torch.float16)
        h, got = fastpath.add_norm_mlp(norm, w13, w2, x, None)
        assert calls[0] == 1 and h is x
        assert torch.equal(got, fastpath.swiglu_linear(w2, fastpath.norm_linear(norm, w13, x)))


def test_hidden_states_fold_the_pending_add_into_the_final_norm(monkeypatch):
    """hidden_states carries each block's output unadded to the next norm; the final norm takes it
    for the selected / last positions only. Same values as the full sequence's rows, and as the
    plain per-block forward (Block.forward adds its own output) up to the fused kernels' roundings."""
    model = _model(NoQuantizer())
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5)).to(DEV)
    monkeypatch.setenv("LOWBIT_FUSED", "1")
    model.setup_caches(2, 16)
    pos = torch.arange(9, device=DEV)
    with torch.no_grad():
        full = model.hidden_states(ids, pos, prefill=True)
        last = model.hidden_states(ids, pos, prefill=True, last_only=True)
        sel = model.hidden_states(ids, pos, prefill=True, select=torch.tensor([4], device=DEV))
        x = model.tok_embeddings(ids)
        cos, sin = model.rope_cos[:9].to(x.dtype), model.rope_sin[:9].to(x.dtype)
        for layer in model.layers:
            x = layer(x, cos, sin, pos, True)
        plain = model.norm(x)
    assert torch.equal(last, full[:, -1:]) and torch.equal(sel, full[:, 4:5])
    torch.testing.assert_close(full, plain, rtol=2e-2, atol=2e-2)


def test_fast_path_stays_off_with_autograd_and_when_disabled(monkeypatch):
    from lowbit.llm import fastpath

    x = torch.randn(3, 64, device=DEV).to(torch.float16)
    monkeypatch.setenv("LOWBIT_FUSED", "1")
    with torch.no_grad():
        assert fastpath.enabled(x) == (torch.cuda.is_available() or fastpath.interpreter_enabled())
        assert not fastpath.enabled(x.float())
    assert not fastpath.enabled(x)  # autograd on: the eager ops (the kernels have no backward)
    monkeypatch.setenv("LOWBIT_FUSED", "0")
    with torch.no_grad():
        assert not fastpath.enabled(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default (auto) mode is CUDA-only")
def test_fast_path_is_the_cuda_default(monkeypatch):
    from lowbit.llm import fastpath

    monkeypatch.delenv("LOWBIT_FUSED", raising=False)
    with torch.no_grad():
        assert fastpath.enabled(torch.randn(2, 8, device="cuda", dtype=torch.bfloat16))


def test_decode_steps_read_the_cache_with_the_decode_attention_kernel(monkeypatch):
    from lowbit.kernels import attention

    model = _model(NoQuantizer())
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEV)
    nxt = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(3)).to(DEV)

    def run(mode: str) -> torch.Tensor:
        _prefill_logits(model, ids, monkeypatch, mode)
        out = []
        with torch.no_grad(), use_phase(model, Phase.DECODE):
            for i in range(nxt.shape[1]):
                pos = torch.tensor([ids.shape[1] + i], device=DEV)
                out.append(model(nxt[:, i:i + 1], pos).float())
        return torch.cat(out, 1)

    want = run("0")
    calls = _count_calls(monkeypatch, attention, "decode_attention")
    got = run("1")
    assert calls[0] == ARGS.n_layers * nxt.shape[1]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_decode_attention_traces_in_a_fresh_process_state(monkeypatch):
    """The first decode-attention call may come from inside torch.compile (the compiled decode
    step): the gate must not reach anything Dynamo refuses to trace (package lookups)."""
    from lowbit import kernels
    from lowbit.llm import fastpath

    monkeypatch.setenv("LOWBIT_FUSED", "1")
    kernels._triton_installed.cache_clear()
    torch._dynamo.reset()
    q = torch.randn(2, 4, 1, 16, device=DEV, dtype=torch.float16)
    kc = torch.randn(2, 2, 32, 16, device=DEV, dtype=torch.float16)
    vc = torch.randn_like(kc)
    pos = torch.tensor([5], device=DEV)
    with torch.no_grad():
        got = torch.compile(fastpath.decode_attention, fullgraph=True)(q, kc, vc, pos)
        want = fastpath.decode_attention(q, kc, vc, pos)
    assert got is not None and want is not None
    torch.testing.assert_close(got, want)


def test_compiled_decode_rotates_and_writes_the_cache_in_one_op(monkeypatch):
    """The compiled decode step calls lowbit::rope_cache_update (mutating the KV caches); logits
    and cache contents equal the eager decode step's."""
    from torch._dynamo.backends.common import aot_autograd

    model = _model(NoQuantizer())
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(5)).to(DEV)
    nxt = torch.tensor([[7], [11]], device=DEV)
    pos = torch.tensor([ids.shape[1]], device=DEV)
    graphs = []

    def fw(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    def step(compiled: str | None):
        _prefill_logits(model, ids, monkeypatch, "1")
        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=fw) if compiled == "aot" else compiled
        fn = torch.compile(model, backend=backend, fullgraph=True) if compiled else model
        with torch.no_grad(), use_phase(model, Phase.DECODE):
            out = fn(nxt, pos).float()
        layers = [lay.attention.kv_cache for lay in model.layers]
        caches = [(c.k.clone(), c.v.clone()) for c in layers]
        return out, caches

    calls = _count_calls(monkeypatch, rope, "rope_cache_update")
    want, want_caches = step(None)
    assert calls[0] == ARGS.n_layers
    got, got_caches = step("aot")
    # a mutating op appears functionalized: auto_functionalized_v2(lowbit.rope_cache_update, ...)
    ops = [f"{n.target}{n.args[:1]}" for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("rope_cache_update" in o for o in ops) == ARGS.n_layers
    assert torch.equal(got, want)
    for (k1, v1), (k2, v2) in zip(got_caches, want_caches):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # Inductor (re-inplaces the functionalized op; its own norms round differently): the new
    # position written, within rounding; every other position untouched
    got, got_caches = step("inductor")
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    p = pos.item()
    for (k1, v1), (k2, v2) in zip(got_caches, want_caches):
        torch.testing.assert_close(k1[:, :, p], k2[:, :, p], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(v1[:, :, p], v2[:, :, p], rtol=1e-2, atol=1e-2)
        keep = torch.arange(k1.shape[2], device=DEV) != p
        assert torch.equal(k1[:, :, keep], k2[:, :, keep]) and torch.equal(v1[:, :, keep], v2[:, :, keep])
