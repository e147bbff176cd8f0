"""shard_quantized in one process: shards reassemble the weight; bad splits fail clearly."""

import pytest
import torch
from dist_launch import run_distributed
from dist_workers import hang_on_rank1
from torch import nn

import lowbit
from lowbit.distributed import shard_quantized
from lowbit.formats import configs as C


def _weight(cfg, n=64, k=128):
    lin = nn.Linear(k, n, bias=False)
    lowbit.quantize_(lin, cfg)
    return lin.weight


@pytest.mark.parametrize(
    "cfg",
    [
        C.Int8DynamicActivationInt8WeightConfig(),
        C.Int8DynamicActivationInt4WeightConfig(group_size=32),
        C.Int4WeightOnlyConfig(group_size=None),
        C.Float8WeightOnlyConfig(),
        C.Float8DynamicActivationFloat8WeightConfig(granularity=C.Float8Granularity.TENSOR),
    ],
)
@pytest.mark.parametrize("dim", [0, 1])
def test_shards_reassemble_the_dequantized_weight(cfg, dim):
    w = _weight(cfg)
    shards = [shard_quantized(w, dim, r, 4) for r in range(4)]
    assert all(type(s) is type(w) and s.shape[dim] == w.shape[dim] // 4 for s in shards)
    assert torch.equal(torch.cat([s.dequantize() for s in shards], dim), w.dequantize())


def test_fused_sections_take_each_section_shard():
    w = _weight(C.Int8WeightOnlyConfig(), n=96)
    s = shard_quantized(w, 0, 1, 2, sections=[64, 16, 16])
    full = w.dequantize()
    assert torch.equal(s.dequantize(), torch.cat([full[32:64], full[72:80], full[88:96]]))


def test_int4_row_shard_must_fall_on_group_boundaries():
    w = _weight(C.Int4WeightOnlyConfig(group_size=32), k=192)
    with pytest.raises(ValueError, match="multiple of 32"):
        shard_quantized(w, 1, 0, 4)  # 48 columns per rank: not whole groups
    with pytest.raises(ValueError, match="sections"):
        shard_quantized(w, 0, 0, 2, sections=[32, 16])


def test_launcher_fails_instead_of_hanging(tmp_path):
    with pytest.raises(AssertionError, match="still running|failed"):
        run_distributed(hang_on_rank1, tmp_path, timeout_s=8)
