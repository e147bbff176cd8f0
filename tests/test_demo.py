"""`lowbit demo` end to end on a subset of formats, plus its helpers."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main
from lowbit.demo import DEFAULT_FORMATS, format_table, load_sentences, parse_formats, plot, row_config

ROW_FIELDS = {
    "format",
    "linear_bytes",
    "total_bytes",
    "linear_ratio_vs_fp32",
    "total_ratio_vs_fp32",
    "latency_ms",
    "cosine_mean",
    "cosine_min",
    "config",
    "quantized_layers",
    "skipped_layers",
}


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--formats",
                "int8wo,int4wo:minmax",
                "--device",
                "cpu",
                "--runs",
                "1",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "demo.json").read_text())
    assert saved == printed
    assert printed["device"] == "cpu" and printed["versions"]["torch"] and printed["sentences"] == 48
    rows = {r["format"]: r for r in printed["rows"]}
    assert list(rows) == ["fp32", "int8wo", "int4wo:minmax"]
    for r in rows.values():
        assert ROW_FIELDS <= set(r) and r["latency_ms"] > 0
    assert rows["fp32"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows["int8wo"]["cosine_mean"] > 0.99 and rows["int8wo"]["quantized_layers"] == 37
    assert 0.9 < rows["int4wo:minmax"]["cosine_mean"] < rows["int8wo"]["cosine_mean"]
    # int8: 1 byte/weight + a float32 scale per row; int4: half a byte + group scales and zeros.
    assert 0.25 < rows["int8wo"]["linear_ratio_vs_fp32"] < 0.26
    assert 0.125 < rows["int4wo:minmax"]["linear_ratio_vs_fp32"] < 0.15
    assert rows["int4wo:minmax"]["config"]["scale_search"] == "minmax"
    assert rows["int4wo:minmax"]["total_bytes"] < rows["int8wo"]["total_bytes"] < rows["fp32"]["total_bytes"]
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_table_and_plot_show_every_row_and_errors(tmp_path):
    def row(fmt: str, cos: float) -> dict:
        return {
            "format": fmt,
            "linear_bytes": 4e6 if fmt == "fp32" else 1e6,
            "total_bytes": 2e6,
            "linear_ratio_vs_fp32": 1.0,
            "total_ratio_vs_fp32": 1.0,
            "latency_ms": 3.0,
            "cosine_mean": cos,
            "cosine_min": cos - 0.01,
            "config": None if fmt == "fp32" else {"type": fmt},
        }

    result = {
        "device": "cpu",
        "device_name": "x",
        "sentences": 2,
        "batch_shape": [2, 5],
        "runs": 1,
        "versions": {"torch": "t"},
        "rows": [
            row("fp32", 1.0),
            row("w4a8", 0.95),
            row("int8dq", 0.997),
            {"format": "fp8dq", "error": "RuntimeError: no float8 here"},
        ],
    }
    lines = format_table(result).splitlines()
    assert any(line.startswith("w4a8 ") and "0.95000" in line for line in lines)
    assert any(line.startswith("fp8dq ") and "error: RuntimeError: no float8 here" in line for line in lines)
    png = plot(result, tmp_path / "p.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_parse_formats():
    assert parse_formats(None) == list(DEFAULT_FORMATS)
    assert parse_formats("int8wo, w4a8:minmax") == ["int8wo", "w4a8:minmax"]
    assert row_config("int4wo:minmax").scale_search.value == "minmax"
    for bad, msg in [
        ("int9", "unknown"),
        ("int8dq:minmax", "only"),
        ("w4a8:best", "invalid"),
        (",", "empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_formats(bad)


def test_sentences_are_bundled():
    sentences = load_sentences()
    assert len(sentences) == 48 and len(set(sentences)) == 48
    assert all(s[0].isupper() and s[-1] in ".?!" for s in sentences)
