"""Tensor-parallel quantized linears on torch.distributed (any backend: gloo on CPU, NCCL on GPU).

Sharding works on a quantized weight's inner tensors, so every rank holds a smaller weight of the
same class and runs the same kernels:

* column-wise (`dim=0`, q/k/v/gate/up): rows of qdata, scale and zero_point are split along N;
  each rank computes its slice of the output features (optionally all-gathered).
* row-wise (`dim=1`, o/down): qdata is split along K (int4: at group boundaries and on even K, the
  packing stores two K values per byte); per-group scales split with it, per-row scales stay whole.
  Each rank computes a partial output over its K shard, then an all-reduce sums the partials.

Row-wise with dynamic activation quantization (int8 / W4A8 / float8 per token): a per-token scale
taken over a K shard differs from the single-process one (taken over the full K). The row-wise
linear therefore all-reduces (MAX) the local per-token absmax first, so each rank quantizes its
shard with the full-row scale. Integer paths are then exact: int8 sums its exact integer
accumulators (int64 all-reduce) before the float epilogue; W4A8 (whose epilogue sums float
per-group terms) is exact with `exact=True`, which all-gathers the per-group terms so they are
summed in the single-process order (G / world times the traffic of the default all-reduce, which
is within a few ulps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.qtype import INT8_SYM, QType, ZeroPointDomain, qtype_by_name
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.common import ActGranularity, uses_act_quant
from lowbit.formats.float8 import Float8Tensor
from lowbit.formats.int4 import Int4Tensor
from lowbit.formats.int8 import Int8Tensor

Group = dist.ProcessGroup | None


def shard_range(size: int, rank: int, world: int, align: int = 1, what: str = "dim") -> tuple[int, int]:
    """[start, end) of `rank`'s even shard of `size`; shards must be multiples of `align`."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world}: need 0 <= rank < world")
    if size % world or (size // world) % align:
        raise ValueError(
            f"cannot shard {what}={size} over {world} ranks: each shard must be a multiple of {align}"
            + (" (int4: whole scale groups; pick a smaller group_size)" if align > 2 else "")
        )
    step = size // world
    return rank * step, (rank + 1) * step


def _slice_inner(t: torch.Tensor, dim: int, logical: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Slice an inner tensor that covers `logical` positions along `dim` in equal blocks.

    One element covers `logical // size` positions (a scale group, or 2 packed int4 values). A size
    of 1 (a per-row/per-tensor scale along this dim) is kept whole: it applies to every shard.
    """
    size = t.shape[dim]
    if size == 1 and logical != 1:
        return t
    if logical % size:
        raise ValueError(f"inner tensor of size {size} does not tile {logical} positions along dim {dim}")
    f = logical // size
    parts = []
    for a, b in ranges:
        if a % f or b % f:
            raise ValueError(f"shard [{a}, {b}) does not fall on a block boundary of {f} along dim {dim}")
        parts.append(t.narrow(dim, a // f, (b - a) // f))
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim)


def _align(weight: torch.Tensor, dim: int) -> int:
    if isinstance(weight, Int4Tensor) and dim == 1:
        g = weight.group_size
        return 2 if g == weight.shape[1] else g  # packed pairs; group boundaries
    return 1


def shard_quantized(
    weight: torch.Tensor, dim: int, rank: int, world: int, sections: Sequence[int] | None = None
) -> torch.Tensor:
    """`rank`'s shard of a (quantized or plain) 2-D weight along `dim` (0: N, 1: K).

    `sections`: sizes along `dim` of a fused weight ([q; k; v], [gate; up]); each section is
    sharded on its own and the rank's pieces are concatenated, so rank r holds q_r, k_r, v_r.
    """
    if dim not in (0, 1):
        raise ValueError(f"dim={dim} must be 0 (column-wise, N) or 1 (row-wise, K)")
    if weight.dim() != 2:
        raise ValueError(f"shard_quantized takes a 2-D weight, got shape {tuple(weight.shape)}")
    full = weight.shape[dim]
    sections = list(sections) if sections is not None else [full]
    if sum(sections) != full:
        raise ValueError(f"sections={sections} sum to {sum(sections)}, not the weight's dim {dim} = {full}")
    align = _align(weight, dim)
    ranges, offset = [], 0
    for s in sections:
        a, b = shard_range(s, rank, world, align, what=f"{'NK'[dim]}")
        ranges.append((offset + a, offset + b))
        offset += s
    local = sum(b - a for a, b in ranges)
    if not isinstance(weight, QuantizedTensor):
        return _slice_inner(weight.detach(), dim, full, ranges)
    if not isinstance(weight, (Int8Tensor, Int4Tensor, Float8Tensor)):
        raise TypeError(
            f"shard_quantized supports Int8Tensor, Int4Tensor, Float8Tensor, not {type(weight).__name__}"
        )
    shape = list(weight.shape)
    shape[dim] = local
    # A block spanning the whole dim (per-row / per-tensor scale) spans the whole local dim.
    block = tuple(shape[i] if b >= weight.shape[i] else b for i, b in enumerate(weight.block_size))
    tensors = [None if t is None else _slice_inner(t, dim, full, ranges) for t in weight.inner_tensors()]
    attrs = {**weight.attributes(), "block_size": block}
    return type(weight)(*tensors, shape=tuple(shape), dtype=weight.dtype, **attrs)


def _group_or_world(group: Group) -> dist.ProcessGroup:
    g = group if group is not None else dist.group.WORLD
    if g is None:
        raise RuntimeError("torch.distributed is not initialized")
    return g


def _all_reduce(t: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """all-reduce returning the result: in place eagerly; a functional collective while
    torch.compile traces (Dynamo cannot trace the in-place op, which returns no tensor)."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(t, op, _group_or_world(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


def _all_gather_cat(t: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Every rank's t concatenated along dim (rank order)."""
    t = t.contiguous()
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        gathered = funcol.all_gather_tensor(t, 0, _group_or_world(group))
        return torch.cat(gathered.chunk(dist.get_world_size(group)), dim)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, dim)


def _world(group: Group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class ColwiseQuantLinear(nn.Module):
    """Output features split over ranks; input replicated. `gather_output` all-gathers the result."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group: Group = None,
        gather_output: bool = False,
        sections: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if gather_output and sections is not None and len(sections) > 1:
            raise ValueError("gather_output=True with fused sections would interleave them")
        rank, world = _world(group)
        self.group, self.gather_output = group, gather_output
        self.weight = nn.Parameter(shard_quantized(weight, 0, rank, world, sections), requires_grad=False)
        b = None if bias is None else shard_quantized(bias.detach().reshape(-1, 1), 0, rank, world, sections)
        self.bias = None if b is None else nn.Parameter(b.reshape(-1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        return _all_gather_cat(y, self.group, -1)


class RowwiseQuantLinear(nn.Module):
    """Input features split over ranks; partial outputs all-reduced (bias added once, after).

    `input_is_sharded=False` slices a replicated input locally. `exact` (W4A8 only): sum the
    per-group epilogue terms in the single-process order (bit-identical output, more traffic).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group: Group = None,
        input_is_sharded: bool = True,
        exact: bool = False,
    ) -> None:
        super().__init__()
        rank, world = _world(group)
        self.group, self.input_is_sharded, self.exact = group, input_is_sharded, exact
        self.full_k = weight.shape[1]
        self.k_range = shard_range(self.full_k, rank, world, _align(weight, 1), "K")
        self.weight = nn.Parameter(shard_quantized(weight, 1, rank, world), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Process-wide facts read once (torch.compile cannot trace the package lookup or the
        # environment); the per-call decision below uses only them and the input's device/dtype.
        from lowbit.kernels import _triton_installed, interpreter_enabled

        self._triton = _triton_installed()
        self._interpret = interpreter_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_sharded:
            a, b = self.k_range
            x = x[..., a:b]
        w = self.weight
        x2 = x.reshape(-1, x.shape[-1])
        act = getattr(w, "act_quant", None)
        if isinstance(w, QuantizedTensor) and act is not None and uses_act_quant(act, x):
            y = self._dynamic(x2, w, act)
        else:
            y = nn.functional.linear(x2, w)
            y = _all_reduce(y, self.group)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _w4a8_kernel_ok(self, x2: torch.Tensor, w: Int4Tensor) -> bool:
        """True when w's own W4A8 call on x2 would run a GPU kernel (Triton or CUTLASS), not the
        pure-PyTorch reference: the shard then runs the Triton W4A8 op on its int8 activations.
        (The rule of Int4Tensor._available + resolve_kernel, from attributes torch.compile sees
        as constants: no call into the weight's methods.)"""
        if w.kernel is KernelChoice.REFERENCE or w.zero_point_domain is not ZeroPointDomain.NONE:
            return False
        if x2.dtype not in (torch.float16, torch.bfloat16) or not self._triton:
            return False
        if x2.is_cuda:
            return True
        # CPU: AUTO is the reference; an explicit Triton/CUTLASS choice runs under the interpreter
        return w.kernel is not KernelChoice.AUTO and self._interpret

    def _global_scale(self, x2: torch.Tensor, qt: QType, per_token: bool) -> torch.Tensor:
        """The activation scale over the FULL row: all-reduce(MAX) of the local absmax."""
        xf = x2.to(torch.float32)
        amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax().reshape(1, 1)
        amax = _all_reduce(amax, self.group, "max")
        # Same arithmetic as core.primitives.quantize_per_token_sym (a true IEEE division).
        return (amax / torch.full_like(amax, qt.qmax)).clamp(min=torch.finfo(torch.float32).tiny)

    def _dynamic(self, x2: torch.Tensor, w: QuantizedTensor, act) -> torch.Tensor:
        qt = qtype_by_name(act.qtype)
        sx = self._global_scale(x2, qt, act.granularity is ActGranularity.TOKEN)
        q = x2.to(torch.float32) / sx
        if qt.is_float:
            qx = q.clamp(qt.qmin, qt.qmax).to(qt.storage)
        else:
            qx = torch.round(q).clamp(qt.qmin, qt.qmax).to(qt.storage)
        bias = self.bias
        if isinstance(w, Int8Tensor) and qt == INT8_SYM:
            return _int8_rowwise(qx, sx, w, bias, self.full_k, x2.dtype, self.group)
        if isinstance(w, Int4Tensor) and qt == INT8_SYM:
            kernel = not self.exact and self._w4a8_kernel_ok(x2, w)
            return _w4a8_rowwise(qx, sx, w, bias, x2.dtype, self.group, self.exact, kernel)
        if isinstance(w, Float8Tensor):
            y = (qx.to(torch.float32) @ w.qdata.to(torch.float32).t()) * sx * w.scale.t()
            y = _all_reduce(y, self.group).to(x2.dtype)
            return y if bias is None else y + bias
        raise TypeError(f"row-wise dynamic activations: unsupported {type(w).__name__} with {act}")


def _int8_rowwise(qx, sx, w: Int8Tensor, bias, full_k: int, out_dtype, group) -> torch.Tensor:
    # Exact integer partial sums, summed exactly in int64, then the single-process float epilogue
    # in the dtype it would use (int_group_dot picks float32 below 2**24, else float64).
    if qx.is_cuda:
        from lowbit.formats.int8 import _int_mm_padded

        acc = _int_mm_padded(qx, w.qdata).to(torch.int64)  # int32 tensor-core GEMM, exact
    else:
        acc = (qx.to(torch.float64) @ w.qdata.to(torch.float64).t()).to(torch.int64)
    acc = _all_reduce(acc, group)
    ftype = torch.float32 if full_k * 128 * 128 < 2**24 else torch.float64
    y = (acc.to(ftype) * sx * w.scale.t()).to(out_dtype)
    return y if bias is None else y + bias


def w4a8_kernel_partial(qx: torch.Tensor, sx: torch.Tensor, w: Int4Tensor) -> torch.Tensor:
    """A K shard's float32 W4A8 partial output from the Triton op: sx * (qx @ (q * s)^T), with qx
    this shard's int8 activations and sx the full-row per-token scale."""
    from lowbit.kernels import dispatches_op
    from lowbit.kernels.w4a8.op import _w4a8_linear_q_impl, w4a8_linear_q_op

    # the registered op while tracing (compile, fake tensors); eagerly its body
    op = w4a8_linear_q_op if dispatches_op(qx, w.qdata, False) else _w4a8_linear_q_impl
    return op(qx, sx, w.qdata, w.scale, None, w.block_size[1], torch.float32, "auto")


def _w4a8_rowwise(qx, sx, w: Int4Tensor, bias, out_dtype: torch.dtype, group, exact: bool,
                  kernel: bool) -> torch.Tensor:
    from lowbit.core.packing import unpack_int4
    from lowbit.formats.common import int_group_dot

    g = w.block_size[1]
    if kernel:
        # float32 partial sums, one all-reduce, one rounding
        out = w4a8_kernel_partial(qx, sx, w)
        out = _all_reduce(out, group)
        if bias is not None:
            out = out + bias.to(torch.float32)
        return out.to(out_dtype)

    acc = int_group_dot(qx, unpack_int4(w.qdata), g, 8)  # (G_local, M, N) exact integers
    y = acc.to(torch.float32) * w.scale.to(torch.float32).t().unsqueeze(1)
    corr = w.zero_correction()
    if corr is not None:
        rowsum = qx.to(torch.float32).reshape(qx.shape[0], -1, g).sum(-1)
        y = y + rowsum.t().unsqueeze(-1) * corr.t().unsqueeze(1)
    if exact:
        out = _all_gather_cat(y, group, 0).sum(0) * sx
    else:
        out = y.sum(0)
        out = _all_reduce(out, group) * sx
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
