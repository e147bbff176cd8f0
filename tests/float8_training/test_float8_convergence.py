"""A short training run: emulated float8 follows the fp32 loss curve on real text.

The full claim (d_model 256, 300 steps, within 2%) is benchmarks/bench_float8_training.py
--convergence; this is its fast, small-shape version."""

import copy

import pytest
import torch

from lowbit.float8_training import Float8Linear, Float8TrainingConfig, convert_to_float8_training
from lowbit.float8_training.tiny_lm import TinyLM, TinyLMConfig, load_text_bytes, train


@pytest.fixture(scope="module")
def data():
    return load_text_bytes()


@pytest.fixture(scope="module")
def fp32_run(data):
    torch.manual_seed(0)
    base = TinyLM(TinyLMConfig(d_model=64, n_layers=1, n_heads=2, d_ff=256, seq_len=32))
    return base, train(copy.deepcopy(base), data, steps=60, batch=8, lr=3e-3, warmup=5)


def test_text_is_real_and_bytes(data):
    assert data.dtype == torch.uint8 and len(data) > 100_000
    assert b"def " in bytes(data[:200_000].tolist())  # Python help text, code included


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_loss_tracks_fp32(data, fp32_run, recipe):
    base, ref = fp32_run
    model = copy.deepcopy(base)
    report = convert_to_float8_training(model, Float8TrainingConfig.from_recipe(recipe))
    assert len(report.converted) == 5 and isinstance(model.head, Float8Linear)
    got = train(model, data, steps=60, batch=8, lr=3e-3, warmup=5)
    assert ref.losses[-1] < ref.losses[0] - 1.0  # it learns (byte entropy drops from ~5.5)
    assert abs(got.val_loss - ref.val_loss) / ref.val_loss < 0.03
    assert abs(sum(got.losses[-10:]) - sum(ref.losses[-10:])) / sum(ref.losses[-10:]) < 0.03
