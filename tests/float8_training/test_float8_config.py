"""Float8TrainingConfig: recipes, validation of every invalid combination, JSON round trip."""

import json

import pytest
import torch

from lowbit.float8_training import CastConfig, Float8TrainingConfig, GemmConfig, ScalingGranularity

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ROW, TENSOR = ScalingGranularity.AXISWISE, ScalingGranularity.TENSORWISE


def test_tensorwise_recipe_is_the_default():
    c = Float8TrainingConfig.from_recipe("tensorwise")
    assert c == Float8TrainingConfig()
    assert [c.cast(op).dtype for op in ("input", "weight", "grad_output")] == [E4M3, E4M3, E5M2]
    assert all(c.cast(op).granularity is TENSOR for op in ("input", "weight", "grad_output"))
    assert [c.gemm(g).use_fast_accum for g in ("output", "grad_input", "grad_weight")] == [True, False, False]
    assert not any(c.gemm(g).high_precision for g in ("output", "grad_input", "grad_weight"))
    assert not c.uses_axiswise()


@pytest.mark.parametrize("name", ["rowwise", "rowwise_with_gw_hp"])
def test_rowwise_recipes(name):
    c = Float8TrainingConfig.from_recipe(name, emulate=True)
    assert c.emulate is True
    assert all(c.cast(op).granularity is ROW for op in ("input", "weight", "grad_output"))
    assert c.gemm_output.use_fast_accum
    assert not c.gemm_grad_input.use_fast_accum and not c.gemm_grad_weight.use_fast_accum
    assert c.gemm_grad_weight.high_precision is (name == "rowwise_with_gw_hp")
    assert not c.gemm_output.high_precision and not c.gemm_grad_input.high_precision
    assert c.uses_axiswise()


def test_custom_config_and_string_dtypes():
    c = Float8TrainingConfig(
        cast_grad_output=CastConfig("float8_e5m2", "axiswise"), gemm_output=GemmConfig(high_precision=True)
    )
    assert c.cast_grad_output.dtype is E5M2 and c.cast_grad_output.granularity is ROW
    assert CastConfig("torch.float8_e4m3fn").dtype is E4M3
    assert c.uses_axiswise()  # grad_output feeds float8 GEMMs


def test_uses_axiswise_ignores_high_precision_gemms():
    # input is axiswise but only feeds the output and grad_weight GEMMs, both in high precision
    c = Float8TrainingConfig(
        cast_input=CastConfig(E4M3, ROW),
        gemm_output=GemmConfig(high_precision=True),
        gemm_grad_weight=GemmConfig(high_precision=True),
    )
    assert not c.uses_axiswise()


@pytest.mark.parametrize("name", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_json_round_trip(name):
    c = Float8TrainingConfig.from_recipe(name)
    assert Float8TrainingConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


NOT_ONE_BYTE_FLOAT = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.uint8, torch.bool]
OTHER_ONE_BYTE_FLOATS = [
    getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)
]


@pytest.mark.parametrize("dtype", NOT_ONE_BYTE_FLOAT, ids=str)
def test_cast_rejects_non_one_byte_float(dtype):
    with pytest.raises(
        ValueError, match=r"CastConfig.dtype=.* is not a 1-byte float; allowed: .*float8_e4m3fn"
    ):
        CastConfig(dtype)


@pytest.mark.parametrize("dtype", OTHER_ONE_BYTE_FLOATS, ids=str)
def test_cast_rejects_other_one_byte_floats(dtype):
    with pytest.raises(ValueError, match=r"1-byte float that float8 GEMMs do not take; allowed"):
        CastConfig(dtype)


@pytest.mark.parametrize("bad", ["float8_e3m4", "fp8", 8, None])
def test_cast_rejects_unknown_dtype(bad):
    with pytest.raises(ValueError, match=r"CastConfig.dtype=.*allowed: \['float8_e4m3fn', 'float8_e5m2'\]"):
        CastConfig(bad)


@pytest.mark.parametrize("bad", ["rowwise", "per_channel", 1])
def test_cast_rejects_unknown_granularity(bad):
    with pytest.raises(ValueError, match=r"CastConfig.granularity=.* is invalid; allowed: \['tensorwise', "):
        CastConfig(E4M3, bad)


@pytest.mark.parametrize("field", ["use_fast_accum", "high_precision"])
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_gemm_rejects_non_bool(field, bad):
    with pytest.raises(ValueError, match=rf"GemmConfig.{field}=.* must be a bool"):
        GemmConfig(**{field: bad})


def test_gemm_rejects_fast_accum_in_high_precision():
    with pytest.raises(ValueError, match="use_fast_accum=True only applies to float8 GEMMs"):
        GemmConfig(use_fast_accum=True, high_precision=True)


@pytest.mark.parametrize(
    "field,bad",
    [
        ("cast_input", GemmConfig()),
        ("cast_weight", {"dtype": "float8_e4m3fn"}),
        ("cast_grad_output", E5M2),
        ("gemm_output", CastConfig()),
        ("gemm_grad_input", True),
        ("gemm_grad_weight", None),
    ],
)
def test_config_rejects_wrong_field_types(field, bad):
    with pytest.raises(ValueError, match=rf"Float8TrainingConfig.{field}=.* must be a"):
        Float8TrainingConfig(**{field: bad})


@pytest.mark.parametrize("bad", ["auto", 1, 0])
def test_config_rejects_bad_emulate(bad):
    with pytest.raises(ValueError, match="Float8TrainingConfig.emulate=.* must be a bool"):
        Float8TrainingConfig(emulate=bad)


def test_config_rejects_all_gemms_in_high_precision():
    hp = GemmConfig(high_precision=True)
    with pytest.raises(ValueError, match="at least one must use float8"):
        Float8TrainingConfig(gemm_output=hp, gemm_grad_input=hp, gemm_grad_weight=hp)


# (operands set to e5m2, the GEMM that would then be e5m2 x e5m2)
E5M2_PAIRS = [
    (("input", "weight"), "output"),
    (("grad_output", "weight"), "grad_input"),
    (("grad_output", "input"), "grad_weight"),
]


@pytest.mark.parametrize("operands,gemm", E5M2_PAIRS)
def test_config_rejects_e5m2_times_e5m2(operands, gemm):
    kwargs = {
        f"cast_{op}": CastConfig(E5M2 if op in operands else E4M3)
        for op in ("input", "weight", "grad_output")
    }
    with pytest.raises(
        ValueError,
        match=rf"the {gemm} GEMM would multiply .*float8_e5m2.* at least one "
        "float8_e4m3fn operand",
    ):
        Float8TrainingConfig(**kwargs)
    # the same casts are fine once that GEMM runs in high precision
    c = Float8TrainingConfig(**kwargs, **{f"gemm_{gemm}": GemmConfig(high_precision=True)})
    assert c.gemm(gemm).high_precision


def test_unknown_recipe():
    with pytest.raises(ValueError, match=r"recipe='fp8' is unknown; allowed: \['tensorwise', 'rowwise', "):
        Float8TrainingConfig.from_recipe("fp8")


def test_configs_are_frozen():
    c = Float8TrainingConfig()
    with pytest.raises(AttributeError):
        c.emulate = True  # type: ignore[misc]
