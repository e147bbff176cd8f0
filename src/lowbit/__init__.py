"""lowbit: low-bit quantization for PyTorch (int8, int4, W4A8, float8).

Importing lowbit initialises no CUDA context and does not import triton.
"""

from lowbit.api import FlatQuantizedLinear, OnUnsupported, flatten_quantized_linears, quantize_
from lowbit.core.granularity import PerGroup, PerRow, PerTensor, PerToken
from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.primitives import ScaleSearch
from lowbit.core.qtype import Mapping, ZeroPointDomain
from lowbit.formats.configs import (
    Float8Dtype,
    Float8DynamicActivationFloat8WeightConfig,
    Float8Granularity,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    config_from_short_name,
)
from lowbit.qat import QATConfig
from lowbit.serialization import LoadError, load_quantized, register_safe_globals, save_quantized
from lowbit.sparsity import (
    Int8DynamicActivationSemiSparseInt8WeightConfig,
    SemiSparseConfig,
    sparsify_,
)

register_safe_globals()

W4A8Config = Int8DynamicActivationInt4WeightConfig

__version__ = "0.1.0"

__all__ = [
    "FlatQuantizedLinear",
    "flatten_quantized_linears",
    "Float8DynamicActivationFloat8WeightConfig", "Float8Dtype", "Float8Granularity",
    "Float8WeightOnlyConfig", "Int4WeightOnlyConfig", "Int8DynamicActivationInt4WeightConfig",
    "Int8DynamicActivationInt8WeightConfig", "Int8WeightOnlyConfig", "KernelChoice", "LoadError",
    "Mapping", "OnUnsupported", "PerGroup", "PerRow", "PerTensor", "PerToken", "QATConfig", "QuantConfig",
    "ScaleSearch", "W4A8Config", "ZeroPointDomain", "config_from_short_name", "load_quantized",
    "quantize_", "save_quantized",
    "Int8DynamicActivationSemiSparseInt8WeightConfig", "SemiSparseConfig", "sparsify_",
]
