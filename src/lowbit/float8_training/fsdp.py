"""Float8 all-gather of FSDP2-sharded weights (tensorwise weight scaling).

FSDP2 all-gathers each weight before its module's forward (and again before its backward). By
default it gathers the high-precision shards (2 bytes per element in bf16) and the Float8Linear
then casts the gathered weight to float8. With `Float8TrainingConfig(fsdp_float8_all_gather=True)`
each rank casts its own shard to float8 *before* the all-gather, with the scale of the whole
weight (one all-reduce MAX of the shards' amax), and gathers 1 byte per element:

* `Float8AllGatherWeight` wraps the high-precision Parameter data. Optimizers, state_dict and
  every op other than FSDP2's all-gather see the plain high-precision tensor (ops unwrap it);
  FSDP2 calls its `fsdp_pre_all_gather` / `fsdp_post_all_gather` hooks.
* `Float8GatheredWeight` is the gathered weight: float8 bytes and the float32 dequantization
  scale. The Float8Linear's forward GEMM takes it as its already-cast operand; any other op on it
  sees the dequantized tensor.

The float8 values and scale are exactly those the Float8Linear would compute from the gathered
high-precision weight (the amax of the whole weight is the max of the shards' amax), so the
training step is unchanged bit for bit; only the all-gather bytes halve.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from lowbit.float8_training.config import CastConfig, ScalingGranularity
from lowbit.float8_training.kernels import Float8Operand, cast_with_amax, scale_and_saturate

aten = torch.ops.aten

# View ops: FSDP2 views the all-gather output as the parameter's shape (the gathered weight
# keeps its float8 bytes through them).
_GATHERED_VIEWS = {
    aten.detach.default,
    aten.alias.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.as_strided.default,
    aten.slice.Tensor,
}
# Ops through which FSDP2 builds and views its sharded parameter: their results keep the wrapper
# (so the shard still has the all-gather hooks). Every other op returns plain tensors.
_KEEP_WRAPPER = _GATHERED_VIEWS | {
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.clone.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.copy_.default,
    aten._to_copy.default,
    aten._pin_memory.default,
}


_fused_scale_and_saturate: Any = None


def tensorwise_cast(t: torch.Tensor, amax: torch.Tensor, cast: CastConfig) -> Float8Operand:
    """Float8Operand of t with the tensorwise scale of a tensor whose absmax is `amax`:
    kernels.cast_with_amax, as Float8Linear casts. FSDP2 calls this from its eager all-gather
    hook, where four separate elementwise kernels would move ~6x the bytes of one: on CUDA the
    elementwise part runs as one compiled (Inductor-fused) kernel.
    """
    global _fused_scale_and_saturate
    fn = scale_and_saturate
    if t.is_cuda and not torch.compiler.is_compiling():
        if _fused_scale_and_saturate is None:
            _fused_scale_and_saturate = torch.compile(scale_and_saturate, dynamic=True)
        fn = _fused_scale_and_saturate
    with torch.no_grad():  # (one compiled graph per dtype pair, not per grad mode)
        return cast_with_amax(t, amax, cast.dtype, fn)


def absmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| as float32 in one pass over t (0 for an empty shard)."""
    if t.numel() == 0:
        return t.new_zeros((), dtype=torch.float32)
    return torch.linalg.vector_norm(t, float("inf")).to(torch.float32)


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight whose FSDP2 all-gather sends float8 (see the module docstring)."""

    _tensor: torch.Tensor
    _cast: CastConfig

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, cast: CastConfig) -> "Float8AllGatherWeight":
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            tensor.size(),
            strides=tensor.stride(),
            storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype,
            layout=tensor.layout,
            device=tensor.device,
            requires_grad=tensor.requires_grad,
        )

    def __init__(self, tensor: torch.Tensor, cast: CastConfig) -> None:
        if type(tensor) is not torch.Tensor:
            tensor = tensor.detach()
            if type(tensor) is not torch.Tensor:
                raise TypeError(f"Float8AllGatherWeight wraps a plain tensor, got {type(tensor).__name__}")
        if cast.granularity is not ScalingGranularity.TENSORWISE:
            raise ValueError("float8 all-gather needs a tensorwise weight cast (one scale per weight)")
        self._tensor = tensor
        self._cast = cast

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"Float8AllGatherWeight({self._tensor!r}, cast={self._cast.dtype})"

    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        return ["_tensor"], self._cast

    @staticmethod
    def __tensor_unflatten__(
        inner: dict, cast: Any, outer_size: Any, outer_stride: Any
    ) -> "Float8AllGatherWeight":
        return Float8AllGatherWeight(inner["_tensor"], cast)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        cast: list[CastConfig] = []

        def unwrap(t: Any) -> Any:
            if isinstance(t, Float8AllGatherWeight):
                cast.append(t._cast)
                return t._tensor
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func not in _KEEP_WRAPPER:
            return out
        if func is aten.copy_.default:
            return args[0]  # copied into the wrapped tensor in place

        def wrap(t: Any) -> Any:
            return Float8AllGatherWeight(t, cast[0]) if type(t) is torch.Tensor else t

        return tree_map(wrap, out)

    # FSDP2's all-gather extension (torch.distributed.fsdp.fully_shard)
    def fsdp_pre_all_gather(
        self, mesh: Any, outer_size: Any, outer_stride: Any, module: Any, mp_policy: Any
    ) -> tuple[tuple[torch.Tensor, ...], Any]:
        if mesh.ndim != 1:
            raise NotImplementedError("float8 all-gather supports a 1-D FSDP mesh (not HSDP)")
        shard = self._tensor
        param_dtype = getattr(mp_policy, "param_dtype", None)
        if param_dtype is not None and param_dtype != shard.dtype:
            # mixed precision: cast what the plain path gathers (the weight in param_dtype)
            shard = shard.to(param_dtype)
        amax = absmax(shard)  # (a rank may hold an empty shard of a small weight)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())  # the whole weight's amax
        q = tensorwise_cast(shard, amax, self._cast)
        # the bytes travel as uint8: every backend gathers bytes (gloo has no float8 type)
        data = q.qdata.view(torch.uint8)
        # uneven sharding: FSDP2 gathers equal padded shards of ceil(N / world) rows
        rows = -(-outer_size[0] // mesh.size())
        if data.shape[0] != rows:
            padded = data.new_zeros((rows, *data.shape[1:]))
            padded[: data.shape[0]].copy_(data)
            data = padded
        return (data,), (q.scale, q.qdata.dtype)

    def fsdp_post_all_gather(
        self,
        all_gather_outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        (data,) = all_gather_outputs
        scale, float8_dtype = metadata
        data = data.view(float8_dtype)
        if out is not None:  # later iterations: FSDP2 refilled `data` in place; new scale
            if not isinstance(out, Float8GatheredWeight):
                raise TypeError(f"float8 all-gather: unexpected unsharded parameter {type(out).__name__}")
            out._scale = scale  # rebound, not copied into: a forward may have saved the old one
            return None
        return Float8GatheredWeight(data, scale, param_dtype), all_gather_outputs


class Float8GatheredWeight(torch.Tensor):
    """An all-gathered float8 weight: `_data` (float8) x `_scale` (float32 0-dim) ~ the weight."""

    _data: torch.Tensor
    _scale: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> "Float8GatheredWeight":
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=dtype, device=data.device, requires_grad=False,
        )

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self._data, self._scale = data, scale

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return f"Float8GatheredWeight(shape={tuple(self.shape)}, {self._data.dtype}, scale={self._scale})"

    def operand(self) -> Float8Operand:
        """The (N, K) float8 operand of the forward GEMM, as kernels.cast_to_float8 would make it."""
        return Float8Operand(self._data.contiguous(), self._scale)

    def dequantize(self) -> torch.Tensor:
        return (self._data.to(torch.float32) * self._scale).to(self.dtype)

    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        return ["_data", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(
        inner: dict, dtype: Any, outer_size: Any, outer_stride: Any
    ) -> "Float8GatheredWeight":
        return Float8GatheredWeight(inner["_data"], inner["_scale"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _GATHERED_VIEWS and isinstance(args[0], Float8GatheredWeight):
            w = args[0]
            return Float8GatheredWeight(func(w._data, *args[1:], **kwargs), w._scale, w.dtype)

        def dequant(t: Any) -> Any:
            return t.dequantize() if isinstance(t, Float8GatheredWeight) else t

        return func(*tree_map(dequant, args), **tree_map(dequant, kwargs))


def plain_weight(v: Any) -> Any:
    """A state_dict value without the all-gather wrapper (checkpoints hold plain tensors)."""
    if isinstance(v, Float8AllGatherWeight):
        return v._tensor
    from torch.distributed.tensor import DTensor

    if isinstance(v, DTensor) and isinstance(v._local_tensor, Float8AllGatherWeight):
        return DTensor.from_local(
            v._local_tensor._tensor, v.device_mesh, v.placements, run_check=False,
            shape=v.shape, stride=v.stride(),
        )
    return v


def unwrap_state_dict_hook(module: Any, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Module state_dict post-hook: a plain tensor in place of a Float8AllGatherWeight (only the
    module's own weight can hold one; looking it up keeps state_dict() linear in the layers)."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = plain_weight(state_dict[key])

