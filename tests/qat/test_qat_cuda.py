"""QAT on a CUDA GPU: the fake-quant forward and the converted model's fast kernels agree
bit for bit at every token count the kernel router distinguishes (GEMV, decode, prefill)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QATConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CPU twin: "
                                "test_qat_exact.py)")

CONFIGS = {
    "w4a8-g128": lambda: lowbit.W4A8Config(group_size=128),
    "w4a8-row": lambda: lowbit.W4A8Config(group_size=None),
    "int4wo-g128": lambda: lowbit.Int4WeightOnlyConfig(group_size=128),
    "int8dq": lambda: lowbit.Int8DynamicActivationInt8WeightConfig(),
    "fp8dq-row": lambda: lowbit.Float8DynamicActivationFloat8WeightConfig(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 3, 16, 300])
def test_prepare_equals_convert_on_cuda(name: str, m: int) -> None:
    torch.manual_seed(m)
    cfg = CONFIGS[name]()
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256)).to("cuda", torch.bfloat16)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    lowbit.quantize_(model, QATConfig(cfg, step="prepare"))
    with torch.no_grad():
        fake = model(x)
    lowbit.quantize_(model, QATConfig(cfg, step="convert"))
    with torch.no_grad():
        served = model(x)
    assert torch.equal(fake, served), f"{name} M={m}: max diff {(fake - served).abs().max()}"
