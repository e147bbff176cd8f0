"""`lowbit generate --tp 2` under torchrun (2 gloo processes on CPU) vs one process."""

import json
import os
import subprocess
import sys

import pytest

from lowbit.cli import main

TINY = ["--model", "tiny", "--random-weights", "--device", "cpu", "--max-new-tokens", "8", "--seed", "3"]
FORMATS = {"w4a8": ["--quant", "w4a8", "--group-size", "32"], "int8dq": ["--quant", "int8dq"]}


def _torchrun(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lowbit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("fmt, extra", [("w4a8", []), ("int8dq", []), ("w4a8", ["--compile"])])
def test_tp2_greedy_tokens_equal_one_process(fmt, extra, tmp_path, capsys):
    one = tmp_path / "one.json"
    assert main(["generate", *TINY, *FORMATS[fmt], "--json-out", str(one)]) == 0
    capsys.readouterr()
    two = tmp_path / "tp.json"
    proc = _torchrun(["generate", "--tp", "2", *TINY, *FORMATS[fmt], *extra, "--json-out", str(two)], 400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("tiny ")]
    assert len(lines) == 1 and " tp=2 " in lines[0], proc.stdout  # rank 0 alone prints
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["tp"] == 2 and a["tp"] == 1 and b["compile"] == ("--compile" in extra)
    assert len(b["generated_ids"]) == 8
    assert b["generated_ids"] == a["generated_ids"]
    # each rank holds half of every block's linears (embedding, norms and head are replicated)
    assert b["model_size_bytes"] < a["model_size_bytes"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "launch it with `torchrun --nproc-per-node 2 -m lowbit generate --tp 2"),
        (["--decode-quant", "int8wo"], "--tp does not take --decode-quant"),
        (["--quant", "torch-int4"], "--tp shards lowbit's formats"),
        (["--tp", "1", "--tp", "0"], "--tp 0 must be >= 1"),
    ],
)
def test_tp_bad_use_is_one_line(extra, message, capsys):
    assert main(["generate", "--tp", "2", *TINY, *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_tp_world_size_mismatch(tmp_path):
    proc = _torchrun(["generate", "--tp", "3", *TINY])
    assert proc.returncode != 0
    assert "torchrun started 2 processes: --nproc-per-node must equal --tp" in proc.stderr


def test_torchrun_without_tp_is_refused():
    proc = _torchrun(["generate", *TINY])
    assert proc.returncode != 0
    assert "torchrun started 2 processes but --tp is 1: pass --tp 2" in proc.stderr


def test_failed_tp_load_ends_its_process_group(tmp_path):
    """A --tp load that fails after joining the group (K=384 does not split into 128-groups over
    2 ranks) leaves no process group: the same process can start a new one."""
    code = (
        "import torch.distributed as dist\n"
        "from lowbit.llm.harness import LoadOptions, load\n"
        "try:\n"
        "    load(LoadOptions(model='tiny', random_weights=True, quant='w4a8', group_size=128,"
        " device='cpu', tp=2))\n"
        "except ValueError as e:\n"
        "    assert 'whole scale groups' in str(e), e\n"
        "assert not dist.is_initialized()\n"
        "print('OK')\n"
    )
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    script = tmp_path / "failed_load.py"
    script.write_text(code)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*launcher, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0 and proc.stdout.count("OK") == 2, proc.stderr[-2000:]

