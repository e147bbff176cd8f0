"""GPU: a row-wise W4A8 shard's kernel path (float32 partials of the Triton op) on real kernels.
CPU twin: test_tp.py's w4a8_triton_* cases (2 gloo ranks, TRITON_INTERPRET)."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.core.primitives import quantize_per_token_sym
from lowbit.core.qtype import INT8_SYM
from lowbit.distributed.tp import shard_quantized, w4a8_kernel_partial
from lowbit.formats.configs import Int8DynamicActivationInt4WeightConfig
from lowbit.testing.sqnr import sqnr_db

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("m", [1, 7, 33, 300])
def test_rowwise_w4a8_kernel_partials_sum_to_one_process(m, group):
    torch.manual_seed(0)
    lin = nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    lowbit.quantize_(lin, Int8DynamicActivationInt4WeightConfig(group_size=group))
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = lin(x)  # one process, the AUTO kernels
        qx, sx = quantize_per_token_sym(x, INT8_SYM)  # the full-row scale every rank agrees on
        world, out = 4, torch.zeros(m, 1024, device="cuda", dtype=torch.float32)
        for rank in range(world):
            shard = shard_quantized(lin.weight, 1, rank, world)
            k = shard.shape[1]
            out += w4a8_kernel_partial(qx[:, rank * k : (rank + 1) * k].contiguous(), sx, shard)
    assert sqnr_db(ref.float(), out.to(torch.bfloat16).float()) >= 40  # a few bf16 ulps


def test_tp2_w4a8_llama_greedy_tokens_on_the_gpu_kernels(tmp_path):
    from dist_launch import run_distributed
    from dist_workers import tp_llama_cuda

    results = run_distributed(tp_llama_cuda, tmp_path, timeout_s=240)
    for rank_out in results:
        for name, r in rank_out.items():
            # every block's two row-wise shards (wo, w2) ran the Triton op in the prefill
            assert r["kernel_calls"] == 2 * 4, (name, r["kernel_calls"])
            # float32 partials summed in another order than one process: the logits agree to a
            # few bf16 ulps, so the top token agrees except at near-ties
            ref, tp = r["ref_logits"], r["tp_logits"]
            assert sqnr_db(ref, tp) >= 35, (name, sqnr_db(ref, tp))
            agree = (ref.argmax(-1) == tp.argmax(-1)).float().mean().item()
            assert agree >= 0.95, (name, agree)
            # greedy decoding: the same tokens up to the first near-tie at least
            same = int((r["tp"] == r["ref"]).int().cumprod(1).sum())
            assert same >= 8, (name, r["ref"], r["tp"])
