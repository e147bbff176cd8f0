"""Beyond one GPU: tensor-parallel quantized inference (lowbit.distributed.tp / .llama), quantized
weights as DTensors (.dtensor), `lowbit generate --tp N` (.launch).

Float8 training composes with FSDP2 as is: `convert_to_float8_training(model)` then
`torch.distributed.fsdp.fully_shard` per block; Float8Linear keeps plain high-precision
Parameters, which FSDP2 shards and all-gathers like any nn.Linear weight.
"""

from lowbit.distributed.dtensor import distribute_quantized, gather_quantized
from lowbit.distributed.tp import ColwiseQuantLinear, RowwiseQuantLinear, shard_quantized, shard_range

__all__ = [
    "ColwiseQuantLinear",
    "RowwiseQuantLinear",
    "distribute_quantized",
    "gather_quantized",
    "shard_quantized",
    "shard_range",
]
