"""Quantization-aware training: fake-quantized layers whose forward is the quantized
model's own forward, converted bit-exactly to real quantized weights."""

from lowbit.qat.config import QAT_BASE_CONFIGS, QATConfig, QATStep
from lowbit.qat.fake_quant import FakeQuantizedLinear

__all__ = ["QAT_BASE_CONFIGS", "FakeQuantizedLinear", "QATConfig", "QATStep"]
