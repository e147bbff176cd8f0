"""QuantizedTensor: the base of every quantized weight.

A subclass declares its inner tensors (`tensor_data_names`, optional ones may be
None) and its plain attributes (`tensor_attribute_names`). The base derives
from them: construction, `__tensor_flatten__`/`__tensor_unflatten__` (so
torch.compile sees through it), detach/clone/to/copy_, pickling that
`torch.load(weights_only=True)` accepts, and dispatch of `F.linear` to the
subclass's `_linear`. Any other op raises NotImplementedError naming the op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

aten = torch.ops.aten


class QuantizedTensor(torch.Tensor):
    # Fields every format declares (DESIGN: fixed field names); set by __init__.
    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    block_size: tuple[int, ...]
    act_quant: Any
    kernel: Any
    zero_point_domain: Any

    tensor_data_names: ClassVar[tuple[str, ...]] = ("qdata", "scale", "zero_point")
    tensor_attribute_names: ClassVar[tuple[str, ...]] = ()
    # inner tensors tile the weight blockwise along both dims (lowbit.core.shard_ops: DTensor)
    blockwise: ClassVar[bool] = False
    _aten_table: ClassVar[dict[Any, Callable[..., Any]]] = {}

    @staticmethod
    def __new__(cls, *args: Any, shape: tuple[int, ...], dtype: torch.dtype, **kwargs: Any):
        qdata = args[0]
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, *tensors: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                 **attrs: Any) -> None:
        if len(tensors) != len(self.tensor_data_names):
            raise TypeError(f"{type(self).__name__} takes tensors {self.tensor_data_names}")
        for name, t in zip(self.tensor_data_names, tensors):
            setattr(self, name, t)
        missing = set(self.tensor_attribute_names) - set(attrs)
        if missing:
            raise TypeError(f"{type(self).__name__} is missing attributes {sorted(missing)}")
        for name in self.tensor_attribute_names:
            setattr(self, name, attrs[name])

    # -- structure ---------------------------------------------------------
    def inner_tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, n) for n in self.tensor_data_names]

    def attributes(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.tensor_attribute_names}

    def _rebuild(self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None,
                 **overrides: Any) -> "QuantizedTensor":
        tensors = [None if t is None else fn(t) for t in self.inner_tensors()]
        attrs = {**self.attributes(), **overrides}
        return type(self)(*tensors, shape=tuple(self.shape), dtype=dtype or self.dtype, **attrs)

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        names = [n for n in self.tensor_data_names if getattr(self, n) is not None]
        return names, (tuple(self.shape), self.dtype, tuple(self.attributes().items()))

    @classmethod
    def __tensor_unflatten__(cls, inner: dict, ctx: tuple, outer_size: Any, outer_stride: Any):
        shape, dtype, attrs = ctx
        tensors = [inner.get(n) for n in cls.tensor_data_names]
        return cls(*tensors, shape=shape, dtype=dtype, **dict(attrs))

    def _stable_hash_for_caching(self) -> str:
        """Lets torch.compile's AOT cache key graphs on this weight's format, not its data."""
        return f"{type(self).__name__}:{tuple(self.shape)}:{self.dtype}:{sorted(self.attributes().items())!r}"

    def __repr__(self, **kwargs: Any) -> str:  # type: ignore[override]
        attrs = ", ".join(f"{k}={v}" for k, v in self.attributes().items())
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, {attrs})"

    def __reduce_ex__(self, protocol):  # type: ignore[override]
        # A plain (constructor, args) pair: weights_only loading only needs the class
        # and its attribute types to be allow-listed (lowbit does that at import).
        tensors = tuple(self.inner_tensors())
        return (_rebuild_quantized, (type(self), tensors, tuple(self.shape), self.dtype,
                                      tuple(self.attributes().items())))

    # -- numerics hooks (per subclass) ---------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def nbytes_stored(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inner_tensors() if t is not None)

    # -- dispatch ------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, QuantizedTensor) and not isinstance(x, QuantizedTensor):
                return w._linear(x, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _COMMON_OPS.get(func) or shard_ops.NAMED_OPS.get(func.name())
        if handler is not None:
            return handler(func, args, kwargs)
        raise NotImplementedError(
            f"{cls.__name__} does not support {func}; quantized weights support F.linear, "
            f"detach, clone, to(), copy_, dequantize() and DTensor sharding (view, split, cat, all-gather)"
        )


def _rebuild_quantized(cls: type, tensors: tuple, shape: tuple, dtype: torch.dtype,
                       attrs: tuple) -> QuantizedTensor:
    return cls(*tensors, shape=shape, dtype=dtype, **dict(attrs))


def _detach(func, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0]._rebuild(torch.Tensor.detach))


def _clone(func, args, kwargs):
    return args[0]._rebuild(torch.Tensor.clone)


def _to_copy(func, args, kwargs):
    self: QuantizedTensor = args[0]
    device = kwargs.get("device", None)
    dtype = kwargs.get("dtype", None)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"cannot cast a quantized weight to {dtype}")
    fn = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    return self._rebuild(fn, dtype=dtype)


def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if type(dst) is not type(src) or dst.attributes() != src.attributes() or dst.shape != src.shape:
        raise ValueError(
            f"cannot copy {src!r} into {dst!r}: quantized copies need the same format "
            "(load with load_state_dict(..., assign=True) to replace the weight instead)"
        )
    for d, s in zip(dst.inner_tensors(), src.inner_tensors()):
        if (d is None) != (s is None):
            raise ValueError("cannot copy: inner tensors differ (zero point present in one only)")
        if d is not None and s is not None:
            if d.shape != s.shape:
                raise ValueError(f"cannot copy: inner shapes {tuple(s.shape)} vs {tuple(d.shape)}")
            d.copy_(s)
    return dst


_COMMON_OPS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
}

from lowbit.core import shard_ops  # noqa: E402  (DTensor sharding ops of blockwise formats)

_COMMON_OPS.update(shard_ops.OPS)
