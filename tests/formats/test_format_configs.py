"""Config validation (ValueError naming field, value, allowed values) and JSON round trips."""

from __future__ import annotations

import json

import pytest

import lowbit
from lowbit import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    KernelChoice,
    Mapping,
    QuantConfig,
    ScaleSearch,
    ZeroPointDomain,
    config_from_short_name,
)
from lowbit.formats.configs import CONFIGS_BY_SHORT_NAME

INT4_CONFIGS = [Int4WeightOnlyConfig, Int8DynamicActivationInt4WeightConfig]
THRESHOLD_CONFIGS = [
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationInt4WeightConfig,
    Float8DynamicActivationFloat8WeightConfig,
]
ALL_CONFIGS = [
    Int8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt4WeightConfig,
    Float8WeightOnlyConfig,
    Float8DynamicActivationFloat8WeightConfig,
]


def _name(c) -> str:
    return c.__name__


@pytest.mark.parametrize("cls", INT4_CONFIGS, ids=_name)
@pytest.mark.parametrize("bad", [0, 48, 100, 512, -128, True, "128", 128.0])
def test_bad_group_size(cls, bad):
    with pytest.raises(
        ValueError, match=rf"{cls.__name__}\.group_size=.*allowed: \[32, 64, 128, 256, None\]"
    ):
        cls(group_size=bad)


@pytest.mark.parametrize("cls", INT4_CONFIGS, ids=_name)
@pytest.mark.parametrize("gs", [32, 64, 128, 256, None])
def test_good_group_sizes(cls, gs):
    assert cls(group_size=gs).group_size == gs


@pytest.mark.parametrize(
    "cls,field,bad,allowed",
    [
        (Int4WeightOnlyConfig, "mapping", "asym", "['symmetric', 'asymmetric']"),
        (Int4WeightOnlyConfig, "zero_point_domain", "integer", "['int', 'float', 'none']"),
        (Int4WeightOnlyConfig, "scale_search", "hqq", "['minmax', 'mse']"),
        (Int8DynamicActivationInt4WeightConfig, "mapping", 1, "['symmetric', 'asymmetric']"),
        (Int8WeightOnlyConfig, "kernel", "fast", "'reference'"),
        (Int8DynamicActivationInt8WeightConfig, "kernel", "cuda", "'triton'"),
        (Float8WeightOnlyConfig, "dtype", "e4m3", "['float8_e4m3fn', 'float8_e5m2']"),
        (Float8DynamicActivationFloat8WeightConfig, "granularity", "col", "['tensor', 'row']"),
        (Float8DynamicActivationFloat8WeightConfig, "activation_dtype", "fp8", "float8_e5m2"),
        (Float8DynamicActivationFloat8WeightConfig, "weight_dtype", None, "float8_e4m3fn"),
    ],
)
def test_bad_enum_values_name_the_field(cls, field, bad, allowed):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}=") as info:
        cls(**{field: bad})
    assert allowed in str(info.value)
    assert repr(bad) in str(info.value)


def test_enum_strings_are_accepted_and_stored_as_enums():
    c = Int4WeightOnlyConfig(
        mapping="symmetric", zero_point_domain="int", scale_search="minmax", kernel="reference"
    )
    assert c.mapping is Mapping.SYMMETRIC and c.zero_point_domain is ZeroPointDomain.INT
    assert c.scale_search is ScaleSearch.MINMAX and c.kernel is KernelChoice.REFERENCE


@pytest.mark.parametrize("cls", THRESHOLD_CONFIGS, ids=_name)
@pytest.mark.parametrize("bad", [-1, -100, 2.5, "8", True, None])
def test_bad_decode_threshold(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.decode_threshold=.*int >= 0"):
        cls(decode_threshold=bad)


@pytest.mark.parametrize("cls", THRESHOLD_CONFIGS, ids=_name)
def test_good_decode_threshold(cls):
    assert cls(decode_threshold=0).decode_threshold == 0
    assert cls(decode_threshold=16).decode_threshold == 16


@pytest.mark.parametrize("cls", INT4_CONFIGS, ids=_name)
@pytest.mark.parametrize(
    "mapping,domain,allowed",
    [("symmetric", "float", "['none', 'int']"), ("asymmetric", "none", "['int', 'float']")],
)
def test_bad_mapping_domain_combo_names_allowed(cls, mapping, domain, allowed):
    with pytest.raises(ValueError, match="zero_point_domain") as info:
        cls(mapping=mapping, zero_point_domain=domain)
    assert allowed in str(info.value)


def test_configs_are_frozen():
    c = Int8DynamicActivationInt4WeightConfig()
    with pytest.raises(AttributeError):
        c.group_size = 64  # type: ignore[misc]


def _non_default(cls) -> QuantConfig:
    kwargs: dict = {"kernel": "reference"}
    if cls in INT4_CONFIGS:
        kwargs.update(group_size=64, mapping="asymmetric", zero_point_domain="int", scale_search="minmax")
    if cls in THRESHOLD_CONFIGS:
        kwargs["decode_threshold"] = 12
    if cls is Float8WeightOnlyConfig:
        kwargs["dtype"] = "float8_e5m2"
    if cls is Float8DynamicActivationFloat8WeightConfig:
        kwargs.update(granularity="tensor", activation_dtype="float8_e5m2")
    return cls(**kwargs)


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=_name)
def test_to_dict_from_dict_json_round_trip(cls):
    for cfg in (cls(), _non_default(cls)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["type"] == cls.__name__
        back = QuantConfig.from_dict(d)
        assert back == cfg and type(back) is cls
    assert cls() != _non_default(cls)


def test_from_dict_rejects_unknown_type_and_fields():
    with pytest.raises(ValueError, match="type='Int3Config' is unknown; allowed: "):
        QuantConfig.from_dict({"type": "Int3Config"})
    with pytest.raises(ValueError, match=r"unknown fields \['bits'\]"):
        QuantConfig.from_dict({"type": "Int8WeightOnlyConfig", "bits": 8})
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig.from_dict({"type": "Int4WeightOnlyConfig", "group_size": 7})


def test_short_names_cover_every_format():
    assert set(CONFIGS_BY_SHORT_NAME) == {"int8wo", "int8dq", "int4wo", "w4a8", "fp8wo", "fp8dq"}
    for name, cls in CONFIGS_BY_SHORT_NAME.items():
        assert type(config_from_short_name(name)) is cls
    assert config_from_short_name("w4a8", group_size=64).group_size == 64
    assert lowbit.W4A8Config is Int8DynamicActivationInt4WeightConfig
    with pytest.raises(ValueError, match=r"format='int2' is unknown; allowed: \['fp8dq'"):
        config_from_short_name("int2")


@pytest.mark.parametrize("cls", INT4_CONFIGS, ids=_name)
def test_int4_unsupported_reasons(cls):
    c = cls(group_size=128)
    assert c.unsupported_reason(64, 256) is None
    assert "odd" in c.unsupported_reason(64, 255)
    assert "group_size=128" in c.unsupported_reason(64, 192)
    assert cls(group_size=None).unsupported_reason(64, 10) is None


def test_fp8dq_unsupported_reason():
    c = Float8DynamicActivationFloat8WeightConfig()
    assert c.unsupported_reason(32, 64) is None
    assert "divisible by 16" in c.unsupported_reason(24, 64)
