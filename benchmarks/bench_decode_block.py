"""The fused decode-layer GEMVs (kernels/w4a8/decode_block.py) next to the unfused kernels they
replace, on the GPU: each variant as 8 launches on distinct weights in one CUDA graph (what a
decode step's layers do; far more bytes than L2 holds), median of 20 replays, us per launch.

Usage: python benchmarks/bench_decode_block.py [--model Llama-2-7B] --out FILE.json

Rows: qkv / o / gate_up / down of one layer at M=1, per-row int4 scales:
  plain        the stream GEMV on the already-normalised activation (what the unfused step runs)
  norm / res   the same with the RMSNorm prologue / the residual-add epilogue
  swiglu_bnN   norm + SwiGLU epilogue with N [gate; up] row pairs per tile
  q            down: pre-quantized int8 activations (gemv_q)
  amax_bnN_wW  down: quantized in the kernel from the partial maxima, N rows x W words per program
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_gemv import seq_us  # noqa: E402

from lowbit.core.packing import pack_int4  # noqa: E402
from lowbit.kernels.w4a8.act_quant import act_quant  # noqa: E402
from lowbit.kernels.w4a8.gemv_q import w4a8_gemv_amax, w4a8_gemv_q  # noqa: E402
from lowbit.kernels.w4a8.gemv_stream import stream, stream_config  # noqa: E402
from lowbit.testing.shapes import MODEL_SHAPES  # noqa: E402

COPIES = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="Llama-2-7B")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    shapes = MODEL_SHAPES[args.model]
    torch.manual_seed(0)

    def weights(n, k):
        return [(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)).view(torch.int32),
                 (torch.rand(n, 1, device=dev) * 0.02 + 0.001).to(dt)) for _ in range(COPIES)]

    rows = []

    def add(layer, variant, fn):
        us = seq_us(lambda: [fn(i) for i in range(COPIES)]) / COPIES
        rows.append(dict(layer=layer, variant=variant, us=round(us, 2)))
        print(f"{layer:8s} {variant:16s} {us:7.2f} us", flush=True)

    dim = shapes["o_proj"][1]
    x = torch.randn(1, dim, device=dev).to(dt)
    nw = (torch.rand(dim, device=dev) + 0.5).to(dt)
    for layer in ("qkv_proj", "o_proj"):
        n, k = shapes[layer]
        ws = weights(n, k)
        out = torch.empty(1, n, device=dev, dtype=dt)
        res = torch.randn(1, n, device=dev).to(dt)
        add(layer, "plain", lambda i: stream(x, ws[i][0], ws[i][1], None, out, 0, None))
        if layer == "qkv_proj":
            add(layer, "norm", lambda i: stream(x, ws[i][0], ws[i][1], None, out, 0, None, norm_weight=nw,
                                                eps=1e-5))
        else:
            add(layer, "res", lambda i: stream(x, ws[i][0], ws[i][1], None, out, 0, None, residual=res))
        del ws
    n2, k = shapes["gate_up_proj"]
    ws = weights(n2, k)
    out = torch.empty(1, n2, device=dev, dtype=dt)
    outh = torch.empty(1, n2 // 2, device=dev, dtype=dt)
    add("gate_up", "plain", lambda i: stream(x, ws[i][0], ws[i][1], None, out, 0, None))
    base = stream_config(1, n2 // 2, k)
    for bn in (2, 4, 8):
        for pps in (2, 4):
            cfg = dict(base, BLOCK_N=bn, PPS=pps)
            add("gate_up", f"swiglu_bn{bn}_pps{pps}",
                lambda i, c=cfg: stream(x, ws[i][0], ws[i][1], None, outh, 0, c, norm_weight=nw, eps=1e-5,
                                        swiglu=True))
    _, part = stream(x, ws[0][0], ws[0][1], None, outh, 0, None, norm_weight=nw, eps=1e-5, swiglu=True)
    del ws
    n, k = shapes["down_proj"]
    ws = [(p.view(torch.uint8), s) for p, s in weights(n, k)]
    h = outh.clone()
    qa, sa = act_quant(h)
    res = torch.randn(1, n, device=dev).to(dt)
    add("down", "q", lambda i: w4a8_gemv_q(qa, sa, ws[i][0], ws[i][1], None, k, dt))
    for bn, bw, nw_ in ((4, 256, 4), (8, 256, 4), (8, 128, 4), (16, 128, 4), (16, 64, 4), (16, 128, 8)):
        cfg = dict(BLOCK_N=bn, BLOCK_W=bw, num_warps=nw_, num_stages=1)
        add("down", f"amax_bn{bn}_w{bw}_nw{nw_}",
            lambda i, c=cfg: w4a8_gemv_amax(h, part, ws[i][0], ws[i][1], k, res, c))
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, model=args.model, copies=COPIES,
                git_sha=os.environ.get("LOWBIT_GIT_SHA") or subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
