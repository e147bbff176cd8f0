"""GPU: the float8 all-gather's fused shard cast equals Float8Linear's own tensorwise cast, bit for
bit (CPU twin: tests/distributed/test_fsdp_float8.py, where the step is bit-identical end to end)."""

import pytest
import torch

from lowbit.float8_training.config import CastConfig
from lowbit.float8_training.fsdp import absmax, tensorwise_cast
from lowbit.float8_training.kernels import cast_to_float8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 48), (7, 16)])
@pytest.mark.parametrize("f8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fused_shard_cast_matches_float8_linear_cast(shape, dtype, f8):
    torch.manual_seed(0)
    t = torch.randn(shape, device="cuda", dtype=dtype) * 3
    t[0, 0] = -t.abs().max() * 1.0001  # the extreme value lands on -fmax exactly
    cast = CastConfig(f8)
    q = tensorwise_cast(t, absmax(t), cast)
    ref = cast_to_float8(t, cast)
    assert q.qdata.dtype == f8
    assert torch.equal(q.qdata.view(torch.uint8), ref.qdata.view(torch.uint8))
    assert torch.equal(q.scale, ref.scale)
    assert absmax(t[:0]).item() == 0.0
