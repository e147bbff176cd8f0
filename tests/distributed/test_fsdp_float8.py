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


@pytest.fixture(scope="module")
def all_gather_results(tmp_path_factory):
    from dist_workers import fsdp_float8_all_gather

    return run_distributed(fsdp_float8_all_gather, tmp_path_factory.mktemp("fsdp_f8_gather"), timeout_s=90)


def test_float8_all_gather_gathers_float8(all_gather_results):
    for rank_out in all_gather_results:
        hp, f8 = rank_out["hp"]["seen"], rank_out["float8"]["seen"]
        assert len(hp) == len(f8) == 9  # 3 layers x 3 steps
        assert {t for t, _ in hp} == {"Parameter"} and {d for _, d in hp} == {torch.float32}
        assert {t for t, _ in f8} == {"Float8GatheredWeight"} and {d for _, d in f8} == {torch.float8_e4m3fn}


def test_float8_all_gather_trains_bit_identically(all_gather_results):
    """Same float8 values and scales as casting the gathered weight: every number is equal."""
    for rank_out in all_gather_results:
        hp, f8 = rank_out["hp"], rank_out["float8"]
        for a, b in zip(hp["losses"], f8["losses"]):
            assert torch.equal(a, b)
        for n in hp["grads"]:
            assert torch.equal(hp["grads"][n], f8["grads"][n]), n
            assert torch.equal(hp["params"][n], f8["params"][n]), n
        # state_dict gives plain tensors (the wrapper never leaks into checkpoints)
        assert f8["state_types"] == ["Tensor"]
        for k, v in hp["state"].items():
            assert torch.equal(v, f8["state"][k]), k


def test_float8_all_gather_needs_tensorwise_weight():
    from lowbit.float8_training import Float8TrainingConfig

    with pytest.raises(ValueError, match="needs a tensorwise weight cast"):
        Float8TrainingConfig.from_recipe("rowwise", fsdp_float8_all_gather=True)


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
