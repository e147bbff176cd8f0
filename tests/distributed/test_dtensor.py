"""Quantized weights as DTensors (2 gloo ranks): shard and gather back bit for bit."""

import pytest
import torch
from dist_launch import run_distributed
from dist_workers import dtensor_roundtrip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(dtensor_roundtrip, tmp_path_factory.mktemp("dtensor"), timeout_s=90)


def test_every_format_and_dim_round_trips(results):
    from dist_workers import DTENSOR_CASES

    for rank_out in results:
        # the asymmetric one-group case has equal zero points and different scales per shard
        assert rank_out["asym_edge"]
        cases = {k: v for k, v in rank_out.items() if k not in ("uneven", "asym_edge")}
        assert set(cases) == {(name, dim) for name in DTENSOR_CASES for dim in (0, 1)}
        for (name, dim), r in cases.items():
            assert r["placements"] == [f"S({dim})"], (name, dim)
            assert r["gathered_is_original"], (name, dim)
            assert r["gathered_dequantizes"], (name, dim)
            assert r["distribute_tensor_is_shard"], (name, dim)
            assert r["distribute_tensor_gathers_back"], (name, dim)


def test_uneven_rows_are_refused_on_every_rank(results):
    for rank_out in results:
        assert "splits only into equal pieces: 97" in rank_out["uneven"]


def test_refusals():
    import lowbit
    from lowbit.core.shard_ops import split
    from lowbit.formats.configs import Int8DynamicActivationInt4WeightConfig

    lin = torch.nn.Linear(128, 64)
    lowbit.quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=32))
    with pytest.raises(NotImplementedError, match="is not on a block of 32"):
        split(None, (lin.weight, 16, 1), {})
    with pytest.raises(NotImplementedError, match="splits only into equal pieces: 128 by 48"):
        split(None, (lin.weight, 48, 1), {})
    with pytest.raises(NotImplementedError, match="can only be viewed as its shape"):
        lin.weight.view(64 * 128)
