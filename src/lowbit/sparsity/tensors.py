"""2:4 sparse weights: SemiSparseTensor (fp16/bf16/fp32 values) and SemiSparseInt8Tensor
(int8 values, per-row scales, dynamic per-token int8 activations).

Stored fields (saved, device independent): `qdata` = the kept values (N, K/2) and `meta` =
their 2-bit positions (N, K/8) uint8 (layout in pattern.py), plus `scale` for int8.
On CUDA the weight also carries the runtime form of the 2:4 backend it prepared for
(`packed`, `packed_meta`; see backends.py). Those are passed through torch.compile's
flatten/unflatten and carried by detach/clone, but never saved: a load or a move to
another device rebuilds them.

The reference path (CPU, and KernelChoice.REFERENCE anywhere) is the dense math on the
decompressed weight: exactly F.linear on the pruned weight for SemiSparseTensor, exactly
lowbit's dense int8 W8A8 (Int8Tensor) of the pruned weight for SemiSparseInt8Tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.primitives import dequantize, quantize_per_token_sym
from lowbit.core.qtype import INT8_SYM
from lowbit.core.tensor import QuantizedTensor, aten
from lowbit.formats.common import (
    ActQuant,
    check_activation,
    int_group_dot,
    token_count,
    uses_act_quant,
    warn_once,
)
from lowbit.sparsity import backends
from lowbit.sparsity.backends import Path
from lowbit.sparsity.pattern import compress_24, decompress_24

_BUILD: Any = object()  # "prepare the runtime form if on CUDA" (vs an explicit value, maybe None)
RUNTIME_NAMES = ("packed", "packed_meta")


class _SemiSparseBase(QuantizedTensor):
    fmt = "2:4"
    min_tokens_attr = "SEMI_SPARSE_MIN_TOKENS"

    qdata: torch.Tensor
    meta: torch.Tensor
    kernel: KernelChoice
    packed: torch.Tensor | None
    packed_meta: torch.Tensor | None
    backend: str | None

    def __init__(
        self,
        *tensors: torch.Tensor | None,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        packed: Any = _BUILD,
        packed_meta: torch.Tensor | None = None,
        backend: str | None = None,
        **attrs: Any,
    ) -> None:
        super().__init__(*tensors, shape=shape, dtype=dtype, **attrs)
        if packed is _BUILD:
            self._prepare_backend()
        else:
            self.packed, self.packed_meta, self.backend = packed, packed_meta, backend

    # -- runtime form ------------------------------------------------------
    def _prepare_backend(self) -> None:
        """Build the runtime form of the first usable backend this weight's kernel wants (CUDA
        only). None usable: explicit kernels raise at the call, AUTO warns there (see _path)."""
        self.packed = self.packed_meta = None
        self.backend = None
        if not self.qdata.is_cuda or torch.compiler.is_compiling():
            return
        n, k = self.shape
        for name in backends.wanted_backends(self.kernel):
            if backends.unavailable_reason(name, self.qdata.dtype, self.qdata.device, n, k) is not None:
                continue
            try:
                self.packed, self.packed_meta = backends.pack_for(name, decompress_24(self.qdata, self.meta))
            except RuntimeError as e:  # e.g. a cuSPARSELt build without this GPU's kernels
                if self.kernel is not KernelChoice.AUTO:
                    raise
                warn_once(
                    f"{self.fmt}-{name}-{e}",
                    f"{self.fmt}: {name} could not prepare a 2:4 weight "
                    f"({str(e).splitlines()[0]}); trying the next path",
                )
                continue
            self.backend = name
            return

    def _rebuild(
        self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None, **overrides: Any
    ) -> "QuantizedTensor":
        new_dtype = dtype or self.dtype
        tensors = [None if t is None else fn(t) for t in self.inner_tensors()]
        tensors = self._cast_values(tensors, new_dtype)
        attrs = {**self.attributes(), **overrides}
        kwargs: dict[str, Any] = {}
        same_form = (
            not overrides
            and tensors[0] is not None
            and tensors[0].device == self.qdata.device
            and tensors[0].dtype == self.qdata.dtype
        )
        if same_form:  # detach / clone / a no-op cast: carry the runtime form along
            kwargs = {
                "packed": None if self.packed is None else fn(self.packed),
                "packed_meta": None if self.packed_meta is None else fn(self.packed_meta),
                "backend": self.backend,
            }
        return type(self)(*tensors, shape=tuple(self.shape), dtype=new_dtype, **attrs, **kwargs)

    def _cast_values(self, tensors: list, dtype: torch.dtype) -> list:
        return tensors

    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        names, ctx = super().__tensor_flatten__()
        names += [n for n in RUNTIME_NAMES if getattr(self, n) is not None]
        return names, (*ctx, self.backend)

    @classmethod
    def __tensor_unflatten__(cls, inner: dict, ctx: tuple, outer_size: Any, outer_stride: Any):
        shape, dtype, attrs, backend = ctx
        tensors = [inner.get(n) for n in cls.tensor_data_names]
        return cls(
            *tensors,
            shape=shape,
            dtype=dtype,
            packed=inner.get("packed"),
            packed_meta=inner.get("packed_meta"),
            backend=backend,
            **dict(attrs),
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is aten.copy_.default:  # new stored values: the runtime form is stale
            args[0]._prepare_backend()
        return out

    # -- shared pieces -----------------------------------------------------
    def expected_inner_shapes(self) -> dict[str, tuple[int, ...]]:
        """Stored shapes for this weight's (N, K) (serialization validates loads with it)."""
        n, k = self.shape
        return {"qdata": (n, k // 2), "meta": (n, k // 8)}

    def dense_values(self) -> torch.Tensor:
        """The decompressed (N, K) stored values (int8 for the int8 format)."""
        return decompress_24(self.qdata, self.meta)

    def _path(self, x: torch.Tensor) -> Path:
        min_tokens = getattr(backends, self.min_tokens_attr)
        path = backends.choose_path(self.kernel, x.is_cuda, token_count(x), min_tokens, self.backend)
        if isinstance(path, Path):
            if path is Path.DENSE and self.backend is None and self.kernel is KernelChoice.AUTO:
                self._warn_no_backend()
            return path
        n, k = self.shape
        reason = (
            backends.unavailable_reason(path, self.qdata.dtype, self.qdata.device, n, k)
            if path in (backends.CUSPARSELT, backends.CUTLASS)
            else "no such 2:4 kernel"
        )
        raise RuntimeError(
            f"kernel={self.kernel.value!r} requested for {self.fmt} but unavailable: "
            f"{reason or 'the weight was not prepared on this device'}"
        )

    def _runtime(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed, packed_meta) of the prepared backend; meta is a dummy for cuSPARSELt."""
        if self.packed is None:
            raise RuntimeError(f"{self.fmt}: no 2:4 kernel was prepared for this weight")
        return self.packed, self.packed if self.packed_meta is None else self.packed_meta

    def _warn_no_backend(self) -> None:
        n, k = self.shape
        dtype, device = self.qdata.dtype, self.qdata.device
        reasons = "; ".join(
            f"{b}: {backends.unavailable_reason(b, dtype, device, n, k) or 'preparing the weight failed'}"
            for b in (backends.CUSPARSELT, backends.CUTLASS)
        )
        warn_once(f"{self.fmt}-{reasons}", f"{self.fmt}: running the dense path on CUDA ({reasons})")


class SemiSparseTensor(_SemiSparseBase):
    """2:4 sparse high-precision weight: qdata (N, K/2) in the weight's dtype, meta (N, K/8)."""

    fmt = "SemiSparse"
    tensor_data_names = ("qdata", "meta")
    tensor_attribute_names = ("kernel",)

    @classmethod
    def from_dense_24(cls, w: torch.Tensor, kernel: KernelChoice = KernelChoice.AUTO) -> "SemiSparseTensor":
        """From a weight that is already 2:4 (the caller checks; extra non-zeros would be dropped)."""
        values, meta = compress_24(w)
        return cls(values, meta, shape=tuple(w.shape), dtype=w.dtype, kernel=kernel)

    def _cast_values(self, tensors: list, dtype: torch.dtype) -> list:
        return [tensors[0].to(dtype), *tensors[1:]]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dense_values().to(dtype or self.dtype)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        check_activation(x, self.shape[1], self.fmt)
        path = self._path(x)
        x2 = x.reshape(-1, x.shape[-1])
        fast = path in (Path.CUSPARSELT, Path.CUTLASS)
        if fast and x.dtype != self.qdata.dtype:
            raise RuntimeError(
                f"{self.fmt} {path.value} kernel: activation dtype {x.dtype} != weight "
                f"dtype {self.qdata.dtype}; cast the model and inputs to one dtype"
            )
        if path is Path.CUSPARSELT:
            y = backends.cusparselt_mm(self._runtime()[0], x2, bias=bias)
        elif path is Path.CUTLASS:
            y = backends.cutlass_mm(*self._runtime(), x2)
            y = y if bias is None else y + bias
        else:  # the dense math on the pruned weight (reference, and the dense CUDA path)
            y = F.linear(x2, self.dequantize(x.dtype), bias)
        return y.reshape(*x.shape[:-1], self.shape[0])


class SemiSparseInt8Tensor(_SemiSparseBase):
    """2:4 sparse int8 weight: qdata (N, K/2) int8, meta (N, K/8), scale (N, 1) float32 per row;
    with `act_quant`, activations are quantized per token to int8 at run time (W8A8)."""

    fmt = "SemiSparseInt8"
    min_tokens_attr = "INT8_SEMI_SPARSE_MIN_TOKENS"
    tensor_data_names = ("qdata", "meta", "scale")
    tensor_attribute_names = ("block_size", "act_quant", "kernel")
    scale: torch.Tensor
    block_size: tuple[int, ...]
    act_quant: ActQuant | None

    @classmethod
    def from_int8(cls, q: Any, kernel: KernelChoice | None = None) -> "SemiSparseInt8Tensor":
        """From a dense lowbit Int8Tensor whose int8 values are 2:4 (same scales, same numbers)."""
        values, meta = compress_24(q.qdata)
        return cls(
            values,
            meta,
            q.scale,
            shape=tuple(q.shape),
            dtype=q.dtype,
            block_size=q.block_size,
            act_quant=q.act_quant,
            kernel=q.kernel if kernel is None else kernel,
        )

    def expected_inner_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().expected_inner_shapes(), "scale": (self.shape[0], 1)}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(
            self.dense_values(), self.scale, None, self.block_size, output_dtype=dtype or self.dtype
        )

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        check_activation(x, self.shape[1], self.fmt)
        x2 = x.reshape(-1, x.shape[-1])
        if not uses_act_quant(self.act_quant, x):
            # Weight-only (decode_threshold): the same math as lowbit's Int8Tensor weight-only path.
            y = F.linear(x2, self.dequantize(x.dtype))
        else:
            path = self._path(x)
            qx, sx = quantize_per_token_sym(x2, INT8_SYM)
            if path is Path.CUSPARSELT and x.dtype in (torch.float16, torch.bfloat16):
                # Per-row weight scales ride in cuSPARSELt's alpha vector (one rounding to x.dtype),
                # the per-token scales are applied after.
                acc = backends.cusparselt_mm(
                    self._runtime()[0], qx, alpha=self.scale.reshape(-1), out_dtype=x.dtype
                )
                y = (acc * sx).to(x.dtype)
            else:
                if path is Path.CUSPARSELT:
                    acc = backends.cusparselt_mm(self._runtime()[0], qx, out_dtype=torch.int32).float()
                elif path is Path.CUTLASS:
                    acc = backends.cutlass_mm(*self._runtime(), qx, out_dtype=torch.int32).float()
                elif path is Path.DENSE:
                    from lowbit.formats.int8 import _int_mm_padded

                    acc = _int_mm_padded(qx, self.dense_values()).to(torch.float32)
                else:  # exact integer dots, as lowbit's Int8Tensor reference
                    acc = int_group_dot(qx, self.dense_values(), self.shape[1], 128)[0]
                y = (acc * sx * self.scale.t()).to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.shape[0])
