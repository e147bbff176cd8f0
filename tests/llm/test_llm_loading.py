"""Streaming quantized loading, every format end to end, bad checkpoints, the int4 baselines."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import torch
from torch import nn

from lowbit.core.tensor import QuantizedTensor
from lowbit.llm import (
    Generator,
    HFCheckpoint,
    ModelArgs,
    PhasedLinear,
    RandomWeights,
    build_model,
    load_model,
    make_quantizer,
)
from lowbit.llm.baselines import TinyGemmInt4Linear
from lowbit.llm.loading import LOWBIT_FORMATS
from lowbit.llm.metrics import model_size
from lowbit.serialization import LoadError

ARGS = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=320)


class RecordingQuantizer:
    """Wraps a quantizer; checks, each time a block is handed over, that no high-precision
    linear weight from another block is still alive and that later blocks are not built yet."""

    def __init__(self, inner, model_ref: list) -> None:
        self.inner, self.label, self.model_ref = inner, inner.label, model_ref
        self.refs: list[weakref.ref] = []
        self.calls = 0
        self.max_alive = 0

    def describe(self):
        return self.inner.describe()

    def apply(self, parent: nn.Module) -> None:
        gc.collect()
        alive_before = [r for r in self.refs if r() is not None]
        assert not alive_before, f"{len(alive_before)} high-precision weights of earlier blocks alive"
        linears = [m for m in parent.modules() if isinstance(m, nn.Linear)]
        self.refs += [weakref.ref(m.weight) for m in linears if not isinstance(m.weight, QuantizedTensor)]
        self.max_alive = max(self.max_alive, sum(r() is not None for r in self.refs))
        self.inner.apply(parent)
        self.calls += 1


@pytest.mark.parametrize("fmt,decode", [("w4a8", None), ("int8dq", "int4wo")])
def test_streaming_load_holds_one_block_of_high_precision_weights(fmt, decode):
    rec = RecordingQuantizer(make_quantizer(fmt, decode), [])
    seen_meta: list[bool] = []

    def on_block(i: int, model: nn.Module) -> None:
        # blocks after i are still meta (not materialised ahead of time)
        later = [p.is_meta for blk in model.layers[i + 1 :] for p in blk.parameters()]
        seen_meta.append(all(later))

    model = build_model(ARGS, RandomWeights(ARGS), rec, "cpu", torch.float32, on_block=on_block)
    gc.collect()
    assert rec.calls == ARGS.n_layers + 1  # every block, then the output layer
    assert rec.max_alive == 4  # one block's wqkv, wo, w13, w2
    assert all(r() is None for r in rec.refs)  # no high-precision copy survives the load
    assert all(seen_meta) and len(seen_meta) == ARGS.n_layers
    kinds = {type(m) for m in model.modules()}
    assert nn.Linear not in kinds or all(
        isinstance(m.weight, QuantizedTensor) for m in model.modules() if isinstance(m, nn.Linear)
    )
    if decode:
        assert PhasedLinear in kinds


def test_streaming_load_from_hf_checkpoint(hf_tiny):
    d, _ = hf_tiny
    rec = RecordingQuantizer(make_quantizer("int8wo"), [])
    model = load_model(str(d), quantizer=rec)
    assert rec.calls == 3 and rec.max_alive == 4
    assert isinstance(model.layers[1].attention.wqkv.weight, QuantizedTensor)


@pytest.mark.parametrize("fmt", ["none", *LOWBIT_FORMATS, "torch-int4", "int8dq+int4wo", "w4a8+none"])
def test_every_format_generates(fmt):
    quant, _, decode = fmt.partition("+")
    model = load_model("tiny", random_weights=True, quantizer=make_quantizer(quant, decode or None))
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    model.setup_caches(2, 16)
    out = Generator(model).generate(ids, 6)
    assert out.tokens.shape == (2, 13) and int(out.tokens.min()) >= 0 and int(out.tokens.max()) < 512
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()
    size = model_size(model).total_bytes
    fp32 = model_size(load_model("tiny", random_weights=True)).total_bytes
    if quant == "none":
        assert size == fp32 == 4 * model.args.num_params()
    elif decode != "none":  # quantized (two copies for a phased pair still beat fp32)
        assert size < fp32


def test_int8_weight_only_size_is_a_quarter_of_fp32_plus_scales():
    q = model_size(load_model("tiny", random_weights=True, quantizer=make_quantizer("int8wo")))
    p = load_model("tiny", random_weights=True).args
    linear = (
        sum(
            n * k
            for n, k in [
                (p.q_dim + 2 * p.kv_dim, p.dim),
                (p.dim, p.q_dim),
                (2 * p.ffn_dim, p.dim),
                (p.dim, p.ffn_dim),
            ]
        )
        * p.n_layers
        + p.vocab_size * p.dim
    )
    rows = (p.q_dim + 2 * p.kv_dim + p.dim + 2 * p.ffn_dim + p.dim) * p.n_layers + p.vocab_size
    other = 4 * (p.vocab_size * p.dim + (2 * p.n_layers + 1) * p.dim)  # fp32 embedding + norms
    assert q.total_bytes == linear + 4 * rows + other
    assert q.read_per_step_bytes == q.total_bytes - 4 * p.vocab_size * p.dim


def test_tinygemm_baseline_matches_lowbit_int4wo():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1))
    ref = torch.nn.functional.linear(x, make_quantizer("int4wo").config.quantize_weight(w).dequantize())
    torch.testing.assert_close(TinyGemmInt4Linear(w)(x), ref, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="N=100"):
        TinyGemmInt4Linear(torch.randn(100, 512))


def test_torchao_baseline_is_an_import_error_without_torchao():
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchao is not usable"):
            make_quantizer("torchao-int4")
    else:
        assert make_quantizer("torchao-int4").label == "torchao-int4"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_raise_one_clear_load_error(hf_tiny, tmp_path):
    d, _ = hf_tiny
    with pytest.raises(LoadError, match="does not exist"):
        HFCheckpoint(tmp_path / "nope")
    no_cfg = _copy(d, tmp_path / "no_cfg")
    (no_cfg / "config.json").unlink()
    with pytest.raises(LoadError, match="config.json is missing"):
        HFCheckpoint(no_cfg)
    bad_json = _copy(d, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        HFCheckpoint(bad_json)
    corrupt = _copy(d, tmp_path / "corrupt")
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(LoadError, match="corrupt or unreadable"):
        HFCheckpoint(corrupt)
    missing_shard = _copy(d, tmp_path / "missing_shard")
    sorted(missing_shard.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(LoadError, match="listed in the index is missing"):
        HFCheckpoint(missing_shard)
    wrong_shape = _copy(d, tmp_path / "wrong_shape")
    cfg = json.loads((wrong_shape / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (wrong_shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="shape mismatch"):
        HFCheckpoint(wrong_shape)
    mistral = _copy(d, tmp_path / "other_arch")
    cfg = json.loads((mistral / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (mistral / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="model_type='gpt2'"):
        HFCheckpoint(mistral)


def test_missing_tensor_in_single_file_checkpoint(hf_tiny, tmp_path, tiny_hf_factory):
    from safetensors.torch import load_file, save_file

    tiny_hf_factory(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, str(f))
    with pytest.raises(LoadError, match="up_proj"):
        HFCheckpoint(tmp_path)


def test_unknown_model_and_preset_without_weights():
    with pytest.raises(ValueError, match="unknown model 'llama-9b'"):
        load_model("llama-9b", random_weights=True)
    with pytest.raises(ValueError, match="--random-weights"):
        load_model("tiny")
    with pytest.raises(ValueError, match="--quant 'int3'"):
        make_quantizer("int3")
    with pytest.raises(ValueError, match="--group-size applies"):
        make_quantizer("int8wo", group_size=64)
