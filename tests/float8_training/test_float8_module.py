"""convert_to_float8_training, Float8Linear in training: bf16, autocast, compile, checkpointing,
state_dict round trips, and the backend choice (clear errors where float8 GEMMs cannot run)."""

import copy
import io

import pytest
import torch
from torch import nn

from lowbit.float8_training import Float8Linear, Float8TrainingConfig, convert_to_float8_training, kernels
from lowbit.float8_training.tiny_lm import TinyLM, TinyLMConfig, lm_loss
from lowbit.testing.sqnr import sqnr_db


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 48, bias=False), nn.Linear(48, 16)).to(
        dtype
    )


def test_convert_swaps_eligible_and_reports_the_rest():
    model = mlp()
    model[3] = nn.Linear(48, 10)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.warns(
        UserWarning, match=r"skipped 1 nn.Linear layer\(s\).*3 \(in_features=48, out_features=10"
    ):
        report = convert_to_float8_training(model)
    assert report.converted == ["0", "2"]
    assert list(report.skipped) == ["3"] and "divisible by 16" in report.skipped["3"]
    assert isinstance(model[0], Float8Linear) and isinstance(model[2], Float8Linear)
    assert type(model[3]) is nn.Linear
    # the very same Parameters (optimizer state built before conversion stays attached)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert "1 skipped" in str(report)


def test_filter_fn_and_idempotence():
    model = mlp()
    report = convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn != "2")
    assert report.converted == ["0", "3"] and type(model[2]) is nn.Linear and not report.skipped
    again = convert_to_float8_training(model)
    assert again.converted == ["2"]  # already-converted layers are left alone


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="not a bare nn.Linear"):
        convert_to_float8_training(nn.Linear(32, 32))
    with pytest.raises(ValueError, match="must be a Float8TrainingConfig"):
        convert_to_float8_training(mlp(), config="tensorwise")


def test_forward_rejects_bad_input():
    model = mlp()
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn == "0")
    with pytest.raises(ValueError, match=r"Float8Linear expects input \(\.\.\., 64\), got \(4, 32\)"):
        model[0](torch.randn(4, 32))
    with pytest.raises(ValueError, match="floating-point input"):
        model[0](torch.ones(4, 64, dtype=torch.long))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise_with_gw_hp"])
def test_bf16_training_without_autocast(recipe):
    ref, model = mlp(torch.bfloat16), mlp(torch.bfloat16)
    convert_to_float8_training(model, Float8TrainingConfig.from_recipe(recipe))
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16)  # 18 tokens: 3-D input, not a multiple of 16
    y, yr = model(x), ref(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 16)
    y.float().square().sum().backward()
    yr.float().square().sum().backward()
    assert sqnr_db(yr.float(), y.float()) >= 18
    for (name, p), pr in zip(model.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.bfloat16, name
        assert sqnr_db(pr.grad.float(), p.grad.float()) >= 15, name  # bias grads are exact-ish


def test_autocast_fp32_master_weights():
    model = mlp()
    convert_to_float8_training(model, Float8TrainingConfig.from_recipe("rowwise"))
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model[0](x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32 and model[0].bias.grad.dtype == torch.float32


def test_frozen_weight_and_no_input_grad():
    model = mlp()
    convert_to_float8_training(model)
    model[0].weight.requires_grad_(False)
    model(torch.randn(8, 64)).sum().backward()
    assert model[0].weight.grad is None and model[0].bias.grad is not None
    assert model[2].weight.grad is not None


@pytest.mark.parametrize(
    "recipe,backend",
    [("tensorwise", "inductor"), ("rowwise", "aot_eager"), ("rowwise_with_gw_hp", "aot_eager")],
)
def test_torch_compile_matches_eager(recipe, backend):
    """fullgraph: no graph break anywhere in the float8 linear. Inductor only on the smallest model
    (its CPU compile is the slow part of this file)."""
    model = mlp() if backend != "inductor" else nn.Sequential(nn.Linear(64, 32))
    convert_to_float8_training(model, Float8TrainingConfig.from_recipe(recipe))
    compiled = copy.deepcopy(model)
    fn = torch.compile(compiled, fullgraph=True, backend=backend)
    x = torch.randn(24, 64)
    y, yc = model(x), fn(x)
    y.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-4)
    for p, pc in zip(model.parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-4, atol=1e-4)


def tiny_lm():
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig(d_model=64, n_layers=2, n_heads=2, d_ff=128, seq_len=16))
    convert_to_float8_training(model, Float8TrainingConfig.from_recipe("rowwise"))
    return model


def test_activation_checkpointing_gives_identical_grads():
    model = tiny_lm()
    window = torch.randint(0, 256, (4, 17))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        lm_loss(model, window, checkpoint=ckpt).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_training_checkpoint_round_trip():
    model = tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    window = torch.randint(0, 256, (4, 17))
    lm_loss(model, window).backward()
    opt.step()
    sd = model.state_dict()
    # plain high-precision tensors under the nn.Linear keys
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in sd.values())
    plain = TinyLM(model.cfg)
    assert sd.keys() == plain.state_dict().keys()
    buf = io.BytesIO()
    torch.save({"model": sd, "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    plain.load_state_dict(ckpt["model"])  # a checkpoint loads into the unconverted model
    resumed = tiny_lm()
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["optim"])
    for m, o in ((model, opt), (resumed, opt2)):
        o.zero_grad()
        lm_loss(m, window).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


# ---------------------------------------------------------------------------- backend choice


def fake_gpu(monkeypatch, major, minor):
    monkeypatch.setattr(kernels, "cuda_capability", lambda index: (major, minor, "Fake GPU"))
    monkeypatch.setattr(kernels.torch.version, "hip", None)
    return torch.device("cuda", 0)


@pytest.mark.parametrize(
    "cap,recipe,needed",
    [((8, 0), "tensorwise", "8.9"), ((8, 9), "rowwise", "9.0"), ((7, 5), "rowwise_with_gw_hp", "9.0")],
)
def test_gpu_without_float8_support_errors(monkeypatch, cap, recipe, needed):
    cuda = fake_gpu(monkeypatch, *cap)
    cfg = Float8TrainingConfig.from_recipe(recipe)
    with pytest.raises(
        RuntimeError,
        match=rf"need an NVIDIA GPU of compute capability >= {needed}; Fake GPU "
        rf"has {cap[0]}.{cap[1]}.*emulate=True",
    ):
        kernels.resolve_emulate(cfg, cuda)
    assert kernels.resolve_emulate(Float8TrainingConfig.from_recipe(recipe, emulate=True), cuda) is True


@pytest.mark.parametrize("cap,recipe", [((8, 9), "tensorwise"), ((9, 0), "rowwise"), ((10, 0), "rowwise")])
def test_supported_gpu_uses_scaled_mm(monkeypatch, cap, recipe):
    cuda = fake_gpu(monkeypatch, *cap)
    assert kernels.resolve_emulate(Float8TrainingConfig.from_recipe(recipe), cuda) is False


def test_cpu_emulates_unless_told_not_to():
    cpu = torch.device("cpu")
    assert kernels.resolve_emulate(Float8TrainingConfig(), cpu) is True
    assert kernels.resolve_emulate(Float8TrainingConfig(emulate=True), cpu) is True
    model = mlp()
    convert_to_float8_training(model, Float8TrainingConfig(emulate=False), lambda m, fqn: fqn == "0")
    with pytest.raises(
        RuntimeError, match=r"compute capability >= 8.9 \(torch._scaled_mm\); the device is cpu"
    ):
        model(torch.randn(4, 64))
