import pytest
import torch
from dist_launch import run_distributed
from dist_workers import fsdp_float8

from lowbit.testing.sqnr import sqnr_db


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(fsdp_float8, tmp_path_factory.mktemp("fsdp_float8"))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fsdp2_float8_step_matches_single_process(results, recipe):
    for rank_out in results:
        r = rank_out[recipe]
        assert r["sharded"], "fully_shard left a parameter unsharded"
        assert sqnr_db(r["ref_loss"].reshape(1), r["loss"].reshape(1)) >= 18
        assert r["grads"].keys() == r["ref_grads"].keys()
        for n, g in r["grads"].items():
            assert sqnr_db(r["ref_grads"][n], g) >= 17, n
            # After the optimizer step the updated shards reassemble the single-process weights.
            assert sqnr_db(r["ref_params"][n], r["params"][n]) >= 30, n
    # Every rank ends with the same full gradients.
    for n in results[0][recipe]["grads"]:
        assert torch.equal(results[0][recipe]["grads"][n], results[1][recipe]["grads"][n])


def test_fsdp2_float8_same_batch_is_exact(results):
    """With the same batch on every rank the float8 casts see the same tensors as one process."""
    for rank_out in results:
        r = rank_out["tensorwise_same_batch"]
        assert torch.equal(r["loss"], r["ref_loss"])
        for n, g in r["grads"].items():
            assert torch.equal(g, r["ref_grads"][n]), f"{n}: {sqnr_db(r['ref_grads'][n], g)} dB"
            assert torch.equal(r["params"][n], r["ref_params"][n]), n


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks_uneven"])
def all_gather_results(request, tmp_path_factory):
    from dist_workers import fsdp_float8_all_gather

    world = request.param
    return run_distributed(
        fsdp_float8_all_gather, tmp_path_factory.mktemp(f"fsdp_f8_gather{world}"), world=world, timeout_s=120
    )


@pytest.mark.parametrize("mp", ["fp32", "bf16"])
def test_float8_all_gather_gathers_float8(all_gather_results, mp):
    for rank_out in all_gather_results:
        hp, f8 = rank_out[(mp, "hp")]["seen"], rank_out[(mp, "float8")]["seen"]
        assert len(hp) == len(f8) == 9  # 3 layers x 3 steps
        param_dtype = torch.bfloat16 if mp == "bf16" else torch.float32
        assert {t for t, _ in hp} == {"Parameter"} and {d for _, d in hp} == {param_dtype}
        assert {t for t, _ in f8} == {"Float8GatheredWeight"} and {d for _, d in f8} == {torch.float8_e4m3fn}


@pytest.mark.parametrize("mp", ["fp32", "bf16"])
def test_float8_all_gather_trains_bit_identically(all_gather_results, mp):
    """Same float8 values and scales as casting the gathered weight: every number is equal
    (also with bf16 mixed precision, and with uneven shards over 3 ranks)."""
    for rank_out in all_gather_results:
        hp, f8 = rank_out[(mp, "hp")], rank_out[(mp, "float8")]
        for a, b in zip(hp["losses"], f8["losses"]):
            assert torch.equal(a, b)
        for n in hp["grads"]:
            assert torch.equal(hp["grads"][n], f8["grads"][n]), n
            assert torch.equal(hp["params"][n], f8["params"][n]), n
        # a sharded checkpoint holds plain local tensors (the wrapper never leaks into it)
        assert f8["state_local_types"] == ["Tensor"]
        for k, v in hp["state"].items():
            assert torch.equal(v, f8["state"][k]), k


def test_float8_all_gather_needs_tensorwise_float8_weight_gemms():
    from lowbit.float8_training import Float8TrainingConfig, GemmConfig

    with pytest.raises(ValueError, match="needs a tensorwise weight cast"):
        Float8TrainingConfig.from_recipe("rowwise", fsdp_float8_all_gather=True)
    for gemm in ("gemm_output", "gemm_grad_input"):
        with pytest.raises(ValueError, match=f"{gemm} runs in high precision"):
            Float8TrainingConfig(fsdp_float8_all_gather=True, **{gemm: GemmConfig(high_precision=True)})


def test_float8_all_gather_keeps_tied_weights_tied():
    from torch import nn

    from lowbit.float8_training import Float8TrainingConfig, convert_to_float8_training
    from lowbit.float8_training.fsdp import Float8AllGatherWeight

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.a, self.b = nn.Embedding(64, 32), nn.Linear(32, 64), nn.Linear(32, 64)
            self.head = nn.Linear(32, 64, bias=False)
            self.b.weight = self.a.weight  # tied between two converted layers
            self.head.weight = self.emb.weight  # tied to a module that stays as is

    m = Tied()
    convert_to_float8_training(m, Float8TrainingConfig.from_recipe("tensorwise", fsdp_float8_all_gather=True))
    assert isinstance(m.a.weight, Float8AllGatherWeight) and m.a.weight is m.b.weight
    assert type(m.head.weight) is nn.Parameter and m.head.weight is m.emb.weight
    assert len(list(m.parameters())) == 4  # emb/head, a/b weight, a bias, b bias


def test_float8_all_gather_weight_without_fsdp(tmp_path):
    """Unsharded, the wrapped weight trains like the plain one and checkpoints as plain tensors."""
    from torch import nn

    from lowbit.float8_training import Float8TrainingConfig, convert_to_float8_training
    from lowbit.float8_training.fsdp import Float8AllGatherWeight

    def model(flag: bool) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))
        config = Float8TrainingConfig.from_recipe("tensorwise", fsdp_float8_all_gather=flag)
        convert_to_float8_training(m, config)
        return m

    plain, wrapped = model(False), model(True)
    assert isinstance(wrapped[0].weight, Float8AllGatherWeight)
    assert isinstance(wrapped[0].weight, nn.Parameter)
    for m in (plain, wrapped):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for s in range(2):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(s))
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (n, p), (_, q) in zip(plain.named_parameters(), wrapped.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), n
    torch.save(wrapped.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)  # no custom class in the checkpoint
    assert {type(v) for v in sd.values()} == {torch.Tensor}
    wrapped.load_state_dict(model(False).state_dict())
    assert isinstance(wrapped[0].weight, Float8AllGatherWeight)
    assert torch.equal(wrapped[0].weight._tensor, model(False)[0].weight)
