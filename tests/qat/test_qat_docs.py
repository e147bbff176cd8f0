"""The example in docs/qat.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "qat.md"


def test_docs_qat_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/qat.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert type(namespace["model"][0]).__name__ == "Linear"
    assert namespace["model"][0].weight.__class__.__name__ == "Int4Tensor"
