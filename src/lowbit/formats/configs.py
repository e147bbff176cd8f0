"""User-facing quantization configs: frozen, validated, JSON round-trippable.

Each config knows which weight shapes it can take (`unsupported_reason`) and how
to turn one high-precision weight into a quantized tensor (`quantize_weight`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lowbit.core.kernel_choice import KernelChoice
from lowbit.core.primitives import ScaleSearch
from lowbit.core.qtype import INT4, Mapping, ZeroPointDomain, check_mapping_domain
from lowbit.core.tensor import QuantizedTensor
from lowbit.formats.common import ActGranularity, ActQuant


class Float8Dtype(str, enum.Enum):
    E4M3 = "float8_e4m3fn"
    E5M2 = "float8_e5m2"


class Float8Granularity(str, enum.Enum):
    TENSOR = "tensor"
    ROW = "row"


INT4_GROUP_SIZES = (32, 64, 128, 256, None)


def _check_enum(cfg: Any, name: str, enum_cls: type[enum.Enum]) -> None:
    value = getattr(cfg, name)
    if isinstance(value, enum_cls):
        return
    try:  # accept the enum's string value, store the enum
        object.__setattr__(cfg, name, enum_cls(value))
    except ValueError:
        raise ValueError(
            f"{type(cfg).__name__}.{name}={value!r} is invalid; allowed: "
            f"{[e.value for e in enum_cls]}"
        ) from None


def _check_threshold(cfg: Any) -> None:
    t = cfg.decode_threshold
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise ValueError(f"{type(cfg).__name__}.decode_threshold={t!r} must be an int >= 0")


@dataclass(frozen=True)
class QuantConfig:
    """Base of all configs."""

    registry: ClassVar[dict[str, type["QuantConfig"]]] = {}
    short_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        QuantConfig.registry[cls.__name__] = cls

    def __post_init__(self) -> None:
        _check_enum(self, "kernel", KernelChoice)

    def unsupported_reason(self, n: int, k: int) -> str | None:
        return None

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    @staticmethod
    def from_dict(d: dict) -> "QuantConfig":
        d = dict(d)
        kind = d.pop("type", None)
        if kind not in QuantConfig.registry:
            raise ValueError(f"config type={kind!r} is unknown; allowed: {sorted(QuantConfig.registry)}")
        cls = QuantConfig.registry[kind]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{kind}: unknown fields {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """int8 per-row symmetric weights, high-precision activations."""

    short_name: ClassVar[str] = "int8wo"
    kernel: KernelChoice = KernelChoice.AUTO

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.formats.int8 import Int8Tensor

        return Int8Tensor.from_hp(w, None, self.kernel)


@dataclass(frozen=True)
class Int8DynamicActivationInt8WeightConfig(QuantConfig):
    """W8A8: per-token symmetric int8 activations x per-row int8 weights."""

    short_name: ClassVar[str] = "int8dq"
    decode_threshold: int = 0
    kernel: KernelChoice = KernelChoice.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_threshold(self)

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.formats.int8 import Int8Tensor

        return Int8Tensor.from_hp(w, ActQuant("int8_sym", ActGranularity.TOKEN,
                                              self.decode_threshold), self.kernel)


def _check_int4(cfg: Any) -> None:
    _check_enum(cfg, "mapping", Mapping)
    _check_enum(cfg, "zero_point_domain", ZeroPointDomain)
    _check_enum(cfg, "scale_search", ScaleSearch)
    # type check first: 128.0 == 128 would pass the membership test and fail later in reshape.
    if not (cfg.group_size is None or type(cfg.group_size) is int) or cfg.group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{type(cfg).__name__}.group_size={cfg.group_size!r} is invalid; "
                         f"allowed: {list(INT4_GROUP_SIZES)} (None = per row)")
    check_mapping_domain(INT4, cfg.mapping, cfg.zero_point_domain)


def _int4_unsupported(group_size: int | None, n: int, k: int) -> str | None:
    if k % 2:
        return f"K={k} is odd (int4 packs two values per byte along K)"
    if group_size is not None and k % group_size:
        return f"K={k} is not divisible by group_size={group_size}"
    return None


@dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """int4 weights packed two per byte, group-wise scales (tinygemm-style asymmetric
    FLOAT zero by default), high-precision activations."""

    short_name: ClassVar[str] = "int4wo"
    group_size: int | None = 128
    mapping: Mapping = Mapping.ASYMMETRIC
    zero_point_domain: ZeroPointDomain = ZeroPointDomain.FLOAT
    scale_search: ScaleSearch = ScaleSearch.MSE
    kernel: KernelChoice = KernelChoice.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int4(self)

    def unsupported_reason(self, n: int, k: int) -> str | None:
        return _int4_unsupported(self.group_size, n, k)

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.formats.int4 import Int4Tensor

        return Int4Tensor.from_hp(w, self.group_size, self.mapping, self.zero_point_domain,
                                  None, self.kernel, self.scale_search)


@dataclass(frozen=True)
class Int8DynamicActivationInt4WeightConfig(QuantConfig):
    """W4A8: per-token symmetric int8 activations ([-127, 127]) x packed int4 weights."""

    short_name: ClassVar[str] = "w4a8"
    group_size: int | None = 128
    mapping: Mapping = Mapping.SYMMETRIC
    zero_point_domain: ZeroPointDomain = ZeroPointDomain.NONE
    scale_search: ScaleSearch = ScaleSearch.MSE
    decode_threshold: int = 0
    kernel: KernelChoice = KernelChoice.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int4(self)
        _check_threshold(self)

    def unsupported_reason(self, n: int, k: int) -> str | None:
        return _int4_unsupported(self.group_size, n, k)

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.formats.int4 import Int4Tensor

        act = ActQuant("int8_sym", ActGranularity.TOKEN, self.decode_threshold)
        return Int4Tensor.from_hp(w, self.group_size, self.mapping, self.zero_point_domain,
                                  act, self.kernel, self.scale_search)


@dataclass(frozen=True)
class Float8WeightOnlyConfig(QuantConfig):
    """float8 per-row weights, high-precision activations."""

    short_name: ClassVar[str] = "fp8wo"
    dtype: Float8Dtype = Float8Dtype.E4M3
    kernel: KernelChoice = KernelChoice.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_enum(self, "dtype", Float8Dtype)

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.core.qtype import qtype_by_name
        from lowbit.formats.float8 import Float8Tensor

        return Float8Tensor.from_hp(w, qtype_by_name(self.dtype.value), True, None, self.kernel)


@dataclass(frozen=True)
class Float8DynamicActivationFloat8WeightConfig(QuantConfig):
    """float8 activations (dynamic) x float8 weights, per-tensor or per-row scales."""

    short_name: ClassVar[str] = "fp8dq"
    granularity: Float8Granularity = Float8Granularity.ROW
    activation_dtype: Float8Dtype = Float8Dtype.E4M3
    weight_dtype: Float8Dtype = Float8Dtype.E4M3
    decode_threshold: int = 0
    kernel: KernelChoice = KernelChoice.AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_enum(self, "granularity", Float8Granularity)
        _check_enum(self, "activation_dtype", Float8Dtype)
        _check_enum(self, "weight_dtype", Float8Dtype)
        _check_threshold(self)

    def unsupported_reason(self, n: int, k: int) -> str | None:
        if n % 16 or k % 16:
            return f"float8 GEMMs need N and K divisible by 16, got N={n}, K={k}"
        return None

    def quantize_weight(self, w: torch.Tensor) -> QuantizedTensor:
        from lowbit.core.qtype import qtype_by_name
        from lowbit.formats.float8 import Float8Tensor

        row = self.granularity is Float8Granularity.ROW
        gran = ActGranularity.TOKEN if row else ActGranularity.TENSOR
        act = ActQuant(self.activation_dtype.value, gran, self.decode_threshold)
        return Float8Tensor.from_hp(w, qtype_by_name(self.weight_dtype.value), row, act,
                                    self.kernel)


CONFIGS_BY_SHORT_NAME: dict[str, type[QuantConfig]] = {
    c.short_name: c for c in QuantConfig.registry.values() if c.short_name
}


def config_from_short_name(name: str, **kwargs: Any) -> QuantConfig:
    if name not in CONFIGS_BY_SHORT_NAME:
        raise ValueError(f"format={name!r} is unknown; allowed: {sorted(CONFIGS_BY_SHORT_NAME)}")
    return CONFIGS_BY_SHORT_NAME[name](**kwargs)
