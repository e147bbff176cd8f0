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
