"""Probe: upper bounds on what removing a decode step's small launches could give, end to end.

Runs `lowbit generate` (Llama-2-7B shapes, random weights, W4A8 per row, batch 1, CUDA-graph decode)
in one process, once as is and once per variant in which a small kernel is replaced by nothing
(its output buffers reused as they are): the residual add + RMSNorm kernels
(fused.add_rms_norm), the int8 quantization of the SwiGLU output (act_quant_from_amax), or both.
The variants compute wrong numbers on purpose: they time a step without those launches, the most
any fusion of them into their neighbours can give. Not a test of anything else.

    python benchmarks/probe_launch_bounds.py [--out results/probe_launch_bounds_h100.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from lowbit import cli
from lowbit.kernels import fused
from lowbit.kernels.w4a8 import act_quant

COMMAND = ["generate", "--model", "llama-2-7b", "--random-weights", "--quant", "w4a8", "--group-size", "0",
           "--prompt-len", "32", "--max-new-tokens", "48", "--runs", "2"]


def _no_norm(x, delta, weight, eps):
    return x, x


_quant_cache: dict = {}


def _no_quant(x, amax):
    key = (tuple(x.shape), x.device)
    if key not in _quant_cache:
        _quant_cache[key] = act_quant.act_quant(x)
    return _quant_cache[key]


VARIANTS = {"as_is": {}, "no_norm": {"norm": _no_norm}, "no_quant": {"quant": _no_quant},
            "no_norm_no_quant": {"norm": _no_norm, "quant": _no_quant}}


def run(name: str) -> list[float]:
    patches = VARIANTS[name]
    real_norm, real_quant = fused.add_rms_norm, act_quant.act_quant_from_amax
    fused.add_rms_norm = patches.get("norm", real_norm)
    act_quant.act_quant_from_amax = patches.get("quant", real_quant)
    try:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cli.main([*COMMAND, "--json-out", f.name])
            rows = json.load(open(f.name))
    finally:
        fused.add_rms_norm, act_quant.act_quant_from_amax = real_norm, real_quant
    return [r["decode_tokens_per_s"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    res: dict[str, list[list[float]]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            res[name].append(run(name))
    base = max(max(r) for r in res["as_is"])
    print(f"{'variant':<18} {'decode tok/s (runs)':<40} best vs as_is")
    for name, runs in res.items():
        best = max(max(r) for r in runs)
        print(f"{name:<18} {str(runs):<40} {best / base:.3f}x")
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "command": "python -m lowbit " + " ".join(COMMAND)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "decode_tokens_per_s": res}, f, indent=1)


if __name__ == "__main__":
    main()
