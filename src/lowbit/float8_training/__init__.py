"""Float8 training: nn.Linear layers whose forward and backward GEMMs run in float8.

    from lowbit.float8_training import Float8TrainingConfig, convert_to_float8_training

    convert_to_float8_training(model, Float8TrainingConfig.from_recipe("tensorwise"))

Recipes: "tensorwise", "rowwise", "rowwise_with_gw_hp"; or a custom Float8TrainingConfig of
per-operand CastConfig and per-GEMM GemmConfig. On CUDA (compute capability >= 8.9, 9.0 for
rowwise) the GEMMs are torch._scaled_mm; elsewhere an emulated reference path runs.
"""

from lowbit.float8_training.autograd import Float8LinearFunction
from lowbit.float8_training.config import (
    FLOAT8_DTYPES,
    CastConfig,
    Float8TrainingConfig,
    GemmConfig,
    Recipe,
    ScalingGranularity,
)
from lowbit.float8_training.linear import Float8ConversionReport, Float8Linear, convert_to_float8_training

__all__ = [
    "FLOAT8_DTYPES",
    "CastConfig",
    "Float8ConversionReport",
    "Float8Linear",
    "Float8LinearFunction",
    "Float8TrainingConfig",
    "GemmConfig",
    "Recipe",
    "ScalingGranularity",
    "convert_to_float8_training",
]
