"""Float8 training numerics on a CUDA GPU (torch._scaled_mm), same floors as the CPU emulation."""

import pytest
import torch

from lowbit.float8_training import Float8LinearFunction, Float8TrainingConfig
from lowbit.testing.sqnr import sqnr_db

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="needs a float8 GPU with rowwise _scaled_mm (CC >= 9.0); CPU twin: test_float8_numerics.py",
)
MIN_FWD_DB, MIN_GRAD_DB = 18.0, 17.0


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
@pytest.mark.parametrize("m,k,n", [(4096, 1024, 2048), (48, 256, 512)])
def test_scaled_mm_path_vs_high_precision(recipe, m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16().requires_grad_()
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y = Float8LinearFunction.apply(x, w, Float8TrainingConfig.from_recipe(recipe), False)
    y.backward(g)
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x2 @ w2.t()
    ref.backward(g.double())
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert sqnr_db(ref.float(), y.float()) >= MIN_FWD_DB
    assert sqnr_db(x2.grad.float(), x.grad.float()) >= MIN_GRAD_DB
    assert sqnr_db(w2.grad.float(), w.grad.float()) >= MIN_GRAD_DB
