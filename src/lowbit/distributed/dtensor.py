"""Quantized weights as DTensors: `distribute_quantized` and `gather_quantized`.

    mesh = init_device_mesh("cuda", (world,))
    dw = distribute_quantized(linear.weight, mesh, dim=0)   # DTensor, placements [Shard(0)]
    dw.to_local()                                           # this rank's Int4Tensor / Int8Tensor / ...
    gather_quantized(dw)                                    # the whole quantized weight again

The local tensor is `shard_quantized`'s shard (same class, smaller: column-wise dim=0 splits N,
row-wise dim=1 splits K at scale-group boundaries). `DTensor.full_tensor()` and
`torch.distributed.tensor.distribute_tensor(w, mesh, [Shard(d)], src_data_rank=None)` work on the
blockwise formats through lowbit.core.shard_ops (all-gather, split and concatenation of the inner
tensors), so a gathered weight is bit-identical to the original.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lowbit.distributed.tp import shard_quantized


def distribute_quantized(weight: torch.Tensor, mesh: DeviceMesh, dim: int) -> DTensor:
    """This rank's shard of a 2-D (quantized) weight along `dim`, as a DTensor over a 1-D mesh.

    Fused [q; k; v] or [gate; up] weights shard each section on their own, which is not a plain
    Shard(dim) of the whole tensor: use shard_quantized(..., sections=...) for them.
    """
    if mesh.ndim != 1:
        raise ValueError(f"distribute_quantized takes a 1-D device mesh, got {mesh.ndim}-D")
    local = shard_quantized(weight, dim, mesh.get_local_rank(), mesh.size())
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=weight.shape,
                              stride=weight.stride())


def gather_quantized(weight: DTensor) -> torch.Tensor:
    """The whole weight of a sharded quantized DTensor (an all-gather of its inner tensors)."""
    if not isinstance(weight, DTensor):
        raise TypeError(f"gather_quantized takes a DTensor, got {type(weight).__name__}")
    return weight.full_tensor()  # (shard_ops waits for the collective: no async wrapper comes back)
