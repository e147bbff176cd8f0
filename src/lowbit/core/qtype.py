"""Small vocabulary of quantized dtypes, mappings and zero-point domains."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Mapping(str, enum.Enum):
    """How the real range maps onto the integer grid."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


class ZeroPointDomain(str, enum.Enum):
    """Where the zero point lives.

    INT:   w = (q - zero_point) * scale, zero_point an integer on the q grid.
    FLOAT: w = q * scale + zero, zero a float offset (the tinygemm convention
           w = (u - mid) * scale + zero with unsigned u = q + mid).
    NONE:  w = q * scale (symmetric only).
    """

    INT = "int"
    FLOAT = "float"
    NONE = "none"


@dataclass(frozen=True)
class QType:
    """An integer or float8 element type with its representable range."""

    name: str
    bits: int
    qmin: float
    qmax: float
    is_float: bool
    storage: torch.dtype

    def __str__(self) -> str:
        return self.name


INT4 = QType("int4", 4, -8, 7, False, torch.int8)
INT8 = QType("int8", 8, -128, 127, False, torch.int8)
# Symmetric int8 for dynamic activations: [-127, 127] so negation is exact.
INT8_SYM = QType("int8_sym", 8, -127, 127, False, torch.int8)
FLOAT8_E4M3 = QType("float8_e4m3fn", 8, -448.0, 448.0, True, torch.float8_e4m3fn)
FLOAT8_E5M2 = QType("float8_e5m2", 8, -57344.0, 57344.0, True, torch.float8_e5m2)

QTYPES = {q.name: q for q in (INT4, INT8, INT8_SYM, FLOAT8_E4M3, FLOAT8_E5M2)}


def qtype_by_name(name: str) -> QType:
    if name not in QTYPES:
        raise ValueError(f"qtype={name!r} is unknown; allowed: {sorted(QTYPES)}")
    return QTYPES[name]


def check_mapping_domain(qtype: QType, mapping: Mapping, domain: ZeroPointDomain) -> None:
    """Raise ValueError naming the allowed values when the combination is meaningless."""
    if qtype.is_float:
        allowed_m, allowed_d = [Mapping.SYMMETRIC], [ZeroPointDomain.NONE]
    elif mapping is Mapping.SYMMETRIC:
        allowed_m = [Mapping.SYMMETRIC, Mapping.ASYMMETRIC]
        allowed_d = [ZeroPointDomain.NONE, ZeroPointDomain.INT]
    else:
        allowed_m = [Mapping.SYMMETRIC, Mapping.ASYMMETRIC]
        allowed_d = [ZeroPointDomain.INT, ZeroPointDomain.FLOAT]
    if mapping not in allowed_m:
        raise ValueError(
            f"mapping={mapping.value!r} is not valid for {qtype}; allowed: "
            f"{[m.value for m in allowed_m]}"
        )
    if domain not in allowed_d:
        raise ValueError(
            f"zero_point_domain={domain.value!r} is not valid with mapping={mapping.value!r} "
            f"for {qtype}; allowed: {[d.value for d in allowed_d]}"
        )
