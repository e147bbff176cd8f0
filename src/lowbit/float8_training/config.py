"""Float8TrainingConfig: how each operand is cast and how each GEMM of a linear runs.

A linear y = x @ W^T runs three GEMMs per training step; each reads two of the three operands:

    output      = input       @ weight^T      reduces over in_features  (K)
    grad_input  = grad_output @ weight        reduces over out_features (N)
    grad_weight = grad_output^T @ input       reduces over tokens       (M)

Per operand one `CastConfig` (float8 dtype + scaling granularity); per GEMM one `GemmConfig`
(fast accumulation, or high precision). An operand has one dtype for both GEMMs it feeds: with
tensorwise scaling this lets one float8 copy serve both (the forward's float8 input is what the
grad_weight GEMM reads), so the rule is structural here rather than a check.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

import torch

# The two float8 formats float8 GEMMs take: e4m3 (more mantissa) for values, e5m2 (more range)
# traditionally for gradients.
FLOAT8_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


class ScalingGranularity(str, enum.Enum):
    """TENSORWISE: one scale per tensor. AXISWISE ("rowwise"): one scale per row of the GEMM operand,
    taken along the axis that GEMM reduces over, so each output element sees one scale per side."""

    TENSORWISE = "tensorwise"
    AXISWISE = "axiswise"


class Recipe(str, enum.Enum):
    TENSORWISE = "tensorwise"
    ROWWISE = "rowwise"
    ROWWISE_WITH_GW_HP = "rowwise_with_gw_hp"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name}={value!r} must be a bool (True or False)")


@dataclass(frozen=True)
class CastConfig:
    """How one operand is cast to float8: target dtype and scaling granularity."""

    dtype: torch.dtype = torch.float8_e4m3fn
    granularity: ScalingGranularity = ScalingGranularity.TENSORWISE

    def __post_init__(self) -> None:
        dtype = self.dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(
                f"CastConfig.dtype={self.dtype!r} is not a torch dtype; allowed: {list(FLOAT8_DTYPES)}"
            )
        if not dtype.is_floating_point or dtype.itemsize != 1:
            raise ValueError(
                f"CastConfig.dtype={_dtype_name(dtype)} is not a 1-byte float; allowed: {list(FLOAT8_DTYPES)}"
            )
        if dtype not in FLOAT8_DTYPES.values():
            raise ValueError(
                f"CastConfig.dtype={_dtype_name(dtype)} is a 1-byte float that float8 GEMMs "
                f"do not take; allowed: {list(FLOAT8_DTYPES)}"
            )
        object.__setattr__(self, "dtype", dtype)
        try:
            object.__setattr__(self, "granularity", ScalingGranularity(self.granularity))
        except ValueError:
            raise ValueError(
                f"CastConfig.granularity={self.granularity!r} is invalid; allowed: "
                f"{[g.value for g in ScalingGranularity]}"
            ) from None

    def to_dict(self) -> dict[str, str]:
        return {"dtype": _dtype_name(self.dtype), "granularity": self.granularity.value}


@dataclass(frozen=True)
class GemmConfig:
    """How one GEMM runs. `use_fast_accum`: let the tensor cores keep partial sums in reduced
    precision (faster, slightly less accurate; fine for the forward, risky for long backward
    reductions). `high_precision`: skip float8 for this GEMM and multiply the original tensors."""

    use_fast_accum: bool = False
    high_precision: bool = False

    def __post_init__(self) -> None:
        _check_bool("GemmConfig", "use_fast_accum", self.use_fast_accum)
        _check_bool("GemmConfig", "high_precision", self.high_precision)
        if self.use_fast_accum and self.high_precision:
            raise ValueError(
                "GemmConfig.use_fast_accum=True only applies to float8 GEMMs; "
                "a GEMM with high_precision=True must have use_fast_accum=False"
            )

    def to_dict(self) -> dict[str, bool]:
        return {"use_fast_accum": self.use_fast_accum, "high_precision": self.high_precision}


_E4M3 = torch.float8_e4m3fn
_E5M2 = torch.float8_e5m2
_ROW = ScalingGranularity.AXISWISE
_TENSOR = ScalingGranularity.TENSORWISE

# GEMM name -> the two operands it reads (first operand, second operand).
GEMM_OPERANDS: dict[str, tuple[str, str]] = {
    "output": ("input", "weight"),
    "grad_input": ("grad_output", "weight"),
    "grad_weight": ("grad_output", "input"),
}


@dataclass(frozen=True)
class Float8TrainingConfig:
    """Float8 training of nn.Linear layers. The defaults are the `tensorwise` recipe.

    `fsdp_float8_all_gather`: under FSDP2 (fully_shard), each rank casts its weight shard to float8
    before the all-gather (tensorwise weight scaling only): half the all-gather bytes of bf16, the
    same float8 values (lowbit.float8_training.fsdp).
    `emulate`: None picks automatically (emulate on CPU and other non-CUDA devices; on a CUDA GPU
    use torch._scaled_mm and raise if the GPU cannot), True always emulates (fp32 math on the
    dequantized float8 values: the numerical reference), False requires the float8 kernels.
    """

    cast_input: CastConfig = field(default_factory=CastConfig)
    cast_weight: CastConfig = field(default_factory=CastConfig)
    cast_grad_output: CastConfig = field(default_factory=lambda: CastConfig(_E5M2))
    gemm_output: GemmConfig = field(default_factory=lambda: GemmConfig(use_fast_accum=True))
    gemm_grad_input: GemmConfig = field(default_factory=GemmConfig)
    gemm_grad_weight: GemmConfig = field(default_factory=GemmConfig)
    emulate: bool | None = None
    fsdp_float8_all_gather: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("cast_") and not isinstance(value, CastConfig):
                raise ValueError(f"Float8TrainingConfig.{f.name}={value!r} must be a CastConfig")
            if f.name.startswith("gemm_") and not isinstance(value, GemmConfig):
                raise ValueError(f"Float8TrainingConfig.{f.name}={value!r} must be a GemmConfig")
        if self.emulate is not None:
            _check_bool("Float8TrainingConfig", "emulate", self.emulate)
        _check_bool("Float8TrainingConfig", "fsdp_float8_all_gather", self.fsdp_float8_all_gather)
        if self.fsdp_float8_all_gather and self.cast_weight.granularity is not _TENSOR:
            raise ValueError(
                "fsdp_float8_all_gather=True needs a tensorwise weight cast (one scale for the whole "
                "weight, agreed across shards); this config casts the weight "
                f"{self.cast_weight.granularity.value}"
            )
        hp_weight = [g for g in ("output", "grad_input") if self.gemm(g).high_precision]
        if self.fsdp_float8_all_gather and hp_weight:
            raise ValueError(
                f"fsdp_float8_all_gather=True gathers only the float8 weight, but gemm_{hp_weight[0]} "
                "runs in high precision and needs the high-precision weight"
            )
        float8_gemms = [g for g in GEMM_OPERANDS if not self.gemm(g).high_precision]
        if not float8_gemms:
            raise ValueError(
                "Float8TrainingConfig runs every GEMM in high precision "
                "(gemm_*.high_precision=True for all three); at least one must use float8"
            )
        for g in float8_gemms:
            a, b = GEMM_OPERANDS[g]
            if self.cast(a).dtype == _E5M2 and self.cast(b).dtype == _E5M2:
                # cuBLASLt has no e5m2 x e5m2 kernel; one side must carry e4m3's mantissa.
                raise ValueError(
                    f"the {g} GEMM would multiply cast_{a}.dtype=float8_e5m2 by "
                    f"cast_{b}.dtype=float8_e5m2; float8 GEMMs need at least one "
                    "float8_e4m3fn operand (change one, or set "
                    f"gemm_{g}.high_precision=True)"
                )

    def cast(self, operand: str) -> CastConfig:
        """CastConfig of 'input', 'weight' or 'grad_output'."""
        return getattr(self, f"cast_{operand}")

    def gemm(self, name: str) -> GemmConfig:
        """GemmConfig of 'output', 'grad_input' or 'grad_weight'."""
        return getattr(self, f"gemm_{name}")

    def uses_axiswise(self) -> bool:
        """True when some float8 GEMM has an axiswise-scaled operand (needs the rowwise kernel)."""
        return any(
            self.cast(op).granularity is _ROW
            for g, ops in GEMM_OPERANDS.items()
            if not self.gemm(g).high_precision
            for op in ops
        )

    @staticmethod
    def from_recipe(
        name: str | Recipe, emulate: bool | None = None, fsdp_float8_all_gather: bool = False
    ) -> "Float8TrainingConfig":
        """`tensorwise`: e4m3 input/weight, e5m2 grad_output, one scale per tensor, fast accumulation
        in the forward GEMM. `rowwise`: e4m3 everywhere with axiswise scales (per-row scales absorb
        the range e5m2 would otherwise provide), fast accumulation in the forward, exact
        accumulation in both backward GEMMs. `rowwise_with_gw_hp`: rowwise, with the grad_weight
        GEMM in high precision (the weight gradient sums over every token: its accuracy matters most).
        """
        try:
            recipe = Recipe(name)
        except ValueError:
            raise ValueError(f"recipe={name!r} is unknown; allowed: {[r.value for r in Recipe]}") from None
        if recipe is Recipe.TENSORWISE:
            return Float8TrainingConfig(emulate=emulate, fsdp_float8_all_gather=fsdp_float8_all_gather)
        row = CastConfig(_E4M3, _ROW)
        gw = GemmConfig(high_precision=recipe is Recipe.ROWWISE_WITH_GW_HP)
        return Float8TrainingConfig(
            cast_input=row,
            cast_weight=row,
            cast_grad_output=row,
            gemm_output=GemmConfig(use_fast_accum=True),
            gemm_grad_input=GemmConfig(),
            gemm_grad_weight=gw,
            emulate=emulate,
            fsdp_float8_all_gather=fsdp_float8_all_gather,  # (refused: the weight cast is axiswise)
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Float8TrainingConfig":
        kwargs: dict[str, Any] = {}
        for f in fields(Float8TrainingConfig):
            if f.name not in d:
                continue
            value = d[f.name]
            if f.name.startswith("cast_"):
                value = CastConfig(**value)
            elif f.name.startswith("gemm_"):
                value = GemmConfig(**value)
            kwargs[f.name] = value
        return Float8TrainingConfig(**kwargs)
