"""The example in docs/float8_training.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "float8_training.md"


def test_docs_float8_training_example_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/float8_training.md has no python example"
    code = blocks[0].replace("/tmp/f8_ckpt.pt", str(tmp_path / "ckpt.pt"))
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    assert [type(m).__name__ for m in namespace["model"]] == ["Float8Linear", "GELU", "Float8Linear"]
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in namespace["model"].parameters())
    sd = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(sd) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
