"""The ops that let a blockwise quantized weight live in a DTensor (Shard(0) / Shard(1)).

A blockwise format (int8, int4 / W4A8, float8: `QuantizedTensor.blockwise = True`) stores inner
tensors that tile the weight along each dim: qdata one element per value (int4: one byte per two
values along K), scale and zero point one element per block. An inner tensor of size 1 along a
dim whose logical size is larger spans the whole dim (a per-row scale along K, a per-tensor
scale): it is replicated, not split, along that dim.

DTensor's Shard -> Replicate redistribution (`full_tensor()`) runs, on the local quantized shard:
the functional all-gather along dim 0 and its wait; for Shard(1) also a split along dim 0 and a
concatenation along dim 1. Each is done here on every inner tensor, with the block size kept
consistent, so `full_tensor()` of a sharded weight gives back the original quantized weight.
`view` to the same shape (DTensor.from_local) is an alias.
"""

from __future__ import annotations

from typing import Any

import torch

aten = torch.ops.aten


def _check(t: Any, what: str) -> None:
    if not getattr(t, "blockwise", False) or t.dim() != 2:
        raise NotImplementedError(f"{type(t).__name__} does not support {what} (blockwise 2-D formats do)")


def _spans(inner: torch.Tensor, dim: int, logical: int) -> bool:
    """True when `inner` has one element spanning all `logical` positions along dim."""
    return inner.shape[dim] == 1 and logical != 1


def _block(qt: Any, dim: int, new_size: int, scale_kept: bool) -> tuple[int, ...]:
    """block_size for the weight resized to new_size along dim. The scale decides: kept whole (one
    value spanning the dim) means the block spans the new size; split or joined along the dim
    means the block (a group, a row) is unchanged."""
    block = list(qt.block_size)
    if scale_kept:
        block[dim] = new_size
    return tuple(block)


def _make(qt: Any, tensors: list, shape: list[int], block: tuple[int, ...]) -> Any:
    attrs = {**qt.attributes(), "block_size": block}
    return type(qt)(*tensors, shape=tuple(shape), dtype=qt.dtype, **attrs)


def view(func, args, kwargs):
    qt, size = args[0], list(args[1])
    if size != list(qt.shape):
        raise NotImplementedError(f"{type(qt).__name__} can only be viewed as its shape {tuple(qt.shape)}")
    from lowbit.core.tensor import _detach  # (tensor.py imports this module)

    return _detach(func, args, kwargs)  # an alias of every inner tensor, as aten.alias / detach


def _gather(t: torch.Tensor | None, n: int, group_size: int, group_name: str) -> torch.Tensor | None:
    if t is None or _spans(t, 0, n):
        return t  # the same on every rank
    # Bytes for 1-byte floats (gloo has no float8 type); waited for at once: the quantized
    # result is rebuilt from the gathered tensors right away.
    raw = t.contiguous()
    if raw.element_size() == 1 and raw.is_floating_point():
        raw = raw.view(torch.uint8)
    c10d = torch.ops._c10d_functional
    out = c10d.wait_tensor(c10d.all_gather_into_tensor(raw, group_size, group_name))
    return out.view(t.dtype)


def all_gather_into_tensor(func, args, kwargs):
    qt, group_size, group_name = args[0], args[1], args[2]
    _check(qt, "all_gather")
    n = qt.shape[0]
    tensors = [
        _gather(t, n, group_size, group_name)
        for t in qt.inner_tensors()
    ]
    shape = [n * group_size, qt.shape[1]]
    return _make(qt, tensors, shape, _block(qt, 0, shape[0], _spans(qt.scale, 0, n)))


def wait_tensor(func, args, kwargs):
    return args[0]  # the all-gather above has waited for its inner tensors already


def split(func, args, kwargs):
    qt, size = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    _check(qt, "split")
    dim = dim % 2
    full = qt.shape[dim]
    if full % size:  # (every rank refuses alike: DTensor would pad only some ranks' shards)
        raise NotImplementedError(f"{type(qt).__name__} splits only into equal pieces: {full} by {size}")
    pieces = []
    for a in range(0, full, size):
        b = a + size
        tensors = []
        for t in qt.inner_tensors():
            if t is None or _spans(t, dim, full):
                tensors.append(t)
                continue
            per = full // t.shape[dim]  # positions per element (a block, or 2 packed int4 values)
            if full % t.shape[dim] or a % per or b % per:
                raise NotImplementedError(f"split at {a}:{b} is not on a block of {per} along dim {dim}")
            tensors.append(t.narrow(dim, a // per, (b - a) // per))
        shape = list(qt.shape)
        shape[dim] = b - a
        pieces.append(_make(qt, tensors, shape, _block(qt, dim, b - a, _spans(qt.scale, dim, full))))
    return pieces


def cat(func, args, kwargs):
    parts = list(args[0])
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    first = parts[0]
    _check(first, "cat")
    dim = dim % 2
    other = 1 - dim
    same = {k: v for k, v in first.attributes().items() if k != "block_size"}
    for p in parts[1:]:
        if type(p) is not type(first) or p.shape[other] != first.shape[other]:
            raise NotImplementedError("cat of quantized weights needs one format and matching shapes")
        if {k: v for k, v in p.attributes().items() if k != "block_size"} != same:
            raise NotImplementedError("cat of quantized weights with different attributes")
        if p.block_size[other] != first.block_size[other]:
            raise NotImplementedError("cat of quantized weights with different blocks along the other dim")
    inner = [[p.inner_tensors()[i] for p in parts] for i in range(len(first.tensor_data_names))]
    # One decision for every inner tensor: a part whose scale (and zero point) holds one value for
    # the whole dim is a per-row / per-tensor weight when that value is the same in every part;
    # then those single values span the joined dim too. Otherwise everything is concatenated
    # (one group per part: the values differ, or coincide and mean the same).
    single = [ts for ts in inner if ts[0] is not None and _spans(ts[0], dim, first.shape[dim])]

    def one_value(ts: list) -> bool:
        spans = all(_spans(t, dim, p.shape[dim]) for t, p in zip(ts, parts))
        return spans and all(torch.equal(ts[0], t) for t in ts[1:])

    keep = bool(single) and all(one_value(ts) for ts in single)
    tensors: list = []
    for ts in inner:
        if ts[0] is None:
            tensors.append(None)
        elif keep and _spans(ts[0], dim, first.shape[dim]):
            tensors.append(ts[0])
        else:
            tensors.append(torch.cat(ts, dim))
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    scale_kept = keep and _spans(first.scale, dim, first.shape[dim])
    return _make(first, tensors, shape, _block(first, dim, shape[dim], scale_kept))


OPS = {
    aten.view.default: view,
    aten.split.Tensor: split,
    aten.cat.default: cat,
}
# Collectives by op name (default overloads): torch.ops._c10d_functional is filled in only when
# torch.distributed is built and, for _wrap_tensor_autograd, imported.
NAMED_OPS = {
    "_c10d_functional::all_gather_into_tensor": all_gather_into_tensor,
    "_c10d_functional::wait_tensor": wait_tensor,
    # (async wrapping of a collective's result: a quantized weight is waited for at once)
    "_c10d_functional::_wrap_tensor_autograd": wait_tensor,
}
