"""2:4 semi-structured sparsity composed with quantization.

* `sparsify_(model, config)`: 2:4 magnitude pruning, reported per layer; with a format config
  the pruned weights are stored compressed (half the values + 2-bit positions).
* `SemiSparseConfig` (2:4 fp16/bf16 weights) and `Int8DynamicActivationSemiSparseInt8WeightConfig`
  (W8A8 with 2:4 int8 weights) also work with `lowbit.quantize_` on weights that are already 2:4.
* `SemiSparseMasks`: fixed-mask sparse fine-tuning, alone or under QAT.
* `speedup_vs_dense` / `pays_off` / `crossover_tokens`: whether 2:4 beats the dense format for a
  (N, K, tokens), from the measured GPU table (see speed.py); `sparsify_(..., faster_at=M)` uses it.
"""

from lowbit.sparsity.api import SemiSparsePruneConfig, SparsifyReport, sparsify_
from lowbit.sparsity.configs import Int8DynamicActivationSemiSparseInt8WeightConfig, SemiSparseConfig
from lowbit.sparsity.pattern import compress_24, decompress_24, is_24, mask_24, prune_24
from lowbit.sparsity.speed import SpeedEstimate, crossover_tokens, pays_off, speedup_vs_dense
from lowbit.sparsity.tensors import SemiSparseInt8Tensor, SemiSparseTensor
from lowbit.sparsity.training import SemiSparseMasks

__all__ = [
    "Int8DynamicActivationSemiSparseInt8WeightConfig",
    "SemiSparseConfig",
    "SemiSparseInt8Tensor",
    "SemiSparseMasks",
    "SemiSparsePruneConfig",
    "SemiSparseTensor",
    "SparsifyReport",
    "SpeedEstimate",
    "compress_24",
    "crossover_tokens",
    "decompress_24",
    "is_24",
    "mask_24",
    "pays_off",
    "prune_24",
    "sparsify_",
    "speedup_vs_dense",
]
