"""benchmarks/bench_float8_training.py runs end to end at tiny sizes (CPU self-check of its logic)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_float8_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_float8_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_smoke_writes_rows(bench, tmp_path):
    out = tmp_path / "speed.json"
    assert bench.main(["--speed", "--smoke", "--no-compile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names[:4] == ["bf16", "lowbit_tensorwise", "lowbit_rowwise", "lowbit_rowwise_with_gw_hp"]
    assert not result["failed"] and result["meta"]["torch"]
    for row in result["rows"][1:4]:
        assert row["ms"] > 0 and row["sqnr_out_vs_bf16_db"] >= 18, row


def test_convergence_smoke_writes_json_and_png(bench, tmp_path):
    out = tmp_path / "conv.json"
    bench.main(
        [
            "--convergence",
            "--steps",
            "2",
            "--batch",
            "2",
            "--layers",
            "1",
            "--recipes",
            "rowwise",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"fp32", "rowwise"} and len(result["runs"]["rowwise"]["losses"]) == 2
    assert result["runs"]["rowwise"]["converted_linears"] == 5
    assert out.with_suffix(".png").stat().st_size > 1000
