"""`lowbit bench` on CPU: reference timings with every row filled, and clear errors on bad input."""

import json

import pytest

from lowbit.cli import main


def test_bench_cpu_json(capsys):
    assert main(["bench", "--m", "1", "3", "--formats", "int8wo,w4a8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["formats"] == ["int8wo", "w4a8"]
    assert len(out["rows"]) == 6  # 3 CPU shapes x 2 token counts
    for row in out["rows"]:
        for key in ("hp", "int8wo", "w4a8"):
            assert isinstance(row[key], float) and row[key] > 0


@pytest.mark.parametrize("argv", [["bench", "--formats", "nope"], ["bench", "--m", "0"]])
def test_bench_bad_input(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_bench_linear_summarize(tmp_path, capsys, monkeypatch):
    """`bench_linear.py --summarize` (no GPU) prints each shape's ratios from the one file that holds them:
    a synthetic file, then the committed M=1/16 run."""
    import importlib.util
    import sys
    from pathlib import Path

    pytest.importorskip("triton")  # bench_linear imports it at the top
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_linear", root / "benchmarks" / "bench_linear.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"N": 64, "K": 128, "M": 1, "impl": impl, "us": us, "pct_copy_ceiling": 12.0}
            for impl, us in [("bf16", 30.0), ("torch_int4_tinygemm_g128", 15.0), ("int_mm_alone", 20.0),
                             ("lowbit_w4a8_row", 10.0), ("lowbit_w4a8_g128", 12.0)]]
    rows.append({"N": 64, "K": 128, "M": 16, "impl": "bf16", "us": 1.0, "pct_copy_ceiling": 1.0})  # no pair
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"meta": {}, "rows": rows}))
    monkeypatch.setattr(sys, "argv", ["bench_linear.py", "--summarize", str(path)])
    mod.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # header + the one complete (shape, M)
    cells = [c.strip() for c in lines[1].split("|")]
    assert cells[1:] == ["64x128", "1", "10.0", "3.00x", "1.50x", "12%", "2.50x", "1.25x", "2.00x"]
    committed = root / "benchmarks" / "results" / "linear_small_m_77e74a7_h100.json"
    monkeypatch.setattr(sys, "argv", ["bench_linear.py", "--summarize", str(committed)])
    mod.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 20  # ten shapes x M in {1, 16}
    row = [c.strip() for c in next(ln for ln in lines if "| 22016x4096 | 1 |" in ln).split("|")]
    assert row[3:6] == ["27.2", "2.98x", "1.32x"]
