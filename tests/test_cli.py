"""The `lowbit` CLI: help texts, doctor, quantize (round trip through load_quantized_hf), errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.integrations.hf import load_hf_model, load_quantized_hf, quantize_hf_model

transformers = pytest.importorskip("transformers")


def test_top_level_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("demo", "quantize", "doctor"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["demo", "quantize", "doctor"])
def test_every_command_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"lowbit {command}" in text.split("examples:")[1]


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert [k["format"] for k in report["kernels"]] == [
        "int8wo",
        "int8dq",
        "int4wo",
        "w4a8",
        "fp8wo",
        "fp8dq",
    ]
    assert {o["name"] for o in report["optional"]} >= {"nvidia-cutlass", "triton", "transformers"}
    for dep in report["optional"]:
        assert dep["present"] or dep["fix"], dep  # an absent dependency always says how to fix it
    if not torch.cuda.is_available():
        assert report["devices"]["gpus"] == []
        assert all(k["path"] == "reference" and "off CUDA" in k["why"] for k in report["kernels"])
        assert not torch.cuda.is_initialized()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(llama).save_pretrained(root / "llama")
    bert = transformers.BertConfig(
        vocab_size=128,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    transformers.BertModel(bert).save_pretrained(root / "bert")
    return root


@pytest.mark.parametrize(
    ("name", "fmt", "extra"), [("llama", "w4a8", ["--group-size", "64"]), ("bert", "int8dq", [])]
)
def test_quantize_then_load_back(hf_dirs, tmp_path, capsys, name, fmt, extra):
    src, out = hf_dirs / name, tmp_path / "q"
    assert main(["quantize", str(src), "--format", fmt, *extra, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == fmt and summary["quantized"] and summary["out"] == str(out)
    assert summary["model_bytes_after"] < summary["model_bytes_before"]
    if name == "llama":
        assert "lm_head" in summary["skipped"] and summary["config"]["group_size"] == 64

    # The same quantization done in-process gives bit-identical outputs to the reloaded CLI result.
    expected = load_hf_model(src)
    quantize_hf_model(expected, lowbit.config_from_short_name(fmt, **({"group_size": 64} if extra else {})))
    loaded = load_quantized_hf(out)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        a, b = expected(input_ids=ids), loaded(input_ids=ids)
    key = "logits" if name == "llama" else "last_hidden_state"
    assert torch.equal(a[key], b[key])


def test_quantize_text_output_names_skipped_layers(hf_dirs, tmp_path, capsys):
    assert (
        main(
            [
                "quantize",
                str(hf_dirs / "llama"),
                "--format",
                "int4wo",
                "--out",
                str(tmp_path / "q"),
                "--skip",
                "*.o_proj",
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "quantized 12 linear layer(s)" in text and "matches skip pattern '*.o_proj'" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "/does/not/exist", "--format", "w4a8", "--out", "/tmp/never"],
        ["quantize", "{llama}", "--format", "w5a5", "--out", "/tmp/never"],
        ["quantize", "{llama}", "--format", "int8dq", "--group-size", "64", "--out", "/tmp/never"],
        ["quantize", "{llama}", "--format", "w4a8", "--out", "{llama}"],
        ["demo", "--formats", "int9"],
    ],
)
def test_errors_exit_nonzero_with_one_line(hf_dirs, capsys, argv):
    argv = [a.format(llama=hf_dirs / "llama") for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lowbit {argv[0]}: error:"), err
