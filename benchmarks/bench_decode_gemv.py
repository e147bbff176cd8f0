"""Batch-1 decode linears on the GPU: each W4A8 M=1 path and torch's int4 tinygemm, per layer and
as the whole per-layer sequence of a Llama decode step.

Usage: python benchmarks/bench_decode_gemv.py [--model Llama-2-7B] [--layers 8] --out FILE.json

1. Per shape (M=1, per row and g128), graph-replayed with L2 flushed between replays (do_bench):
   a config sweep of the pre-quantized GEMV (gemv_q.py) next to the fused-quant stream kernel,
   torch's tinygemm (W4A16 g128) and bf16 cuBLAS.
2. Sequence: --layers copies of one transformer layer's linears (qkv, o, gate_up, down; distinct
   weights, far more bytes than L2 holds), replayed as one CUDA graph: what a decode step pays.
   Paths: `stream` (bf16 x in, quantization in the kernel), `q` (pre-quantized int8 x: in a
   compiled graph the quantization runs inside the RMSNorm / SwiGLU kernel before the linear),
   `actq+q` (a separate act_quant launch per linear: the eager upper bound), `tinygemm`, `bf16`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowbit.bench import cuda_graphed  # noqa: E402
from lowbit.core.packing import pack_int4  # noqa: E402
from lowbit.kernels.w4a8.act_quant import act_quant  # noqa: E402
from lowbit.kernels.w4a8.gemv_dp4a import w4a8_gemv_dp4a  # noqa: E402
from lowbit.kernels.w4a8.gemv_q import gemv_q_config, w4a8_gemv_q  # noqa: E402
from lowbit.testing.shapes import MODEL_SHAPES  # noqa: E402

LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def t_us(fn, rep: int = 40) -> float:
    return triton.testing.do_bench(cuda_graphed(fn), warmup=10, rep=rep, return_mode="median") * 1e3


def seq_us(fn) -> float:
    """Median of 20 replays of one graph, no flush (the graph streams far more than L2)."""
    replay = cuda_graphed(fn)
    for _ in range(3):
        replay()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]


CANDS = [dict(BLOCK_N=bn, BLOCK_W=bw, num_warps=nw, num_stages=ns)
         for bn, bw, nw, ns in itertools.product((4, 8, 16), (64, 128, 256), (4, 8), (1, 3))]
WIDE = [dict(BLOCK_N=bn, BLOCK_W=bw, num_warps=nw, num_stages=ns)
        for bn, bw, nw, ns in itertools.product((2, 4, 8, 16, 32), (64, 128, 256, 512), (2, 4, 8), (1, 3))
        if bn * bw <= 8192]


def main() -> None:
    import bench_linear as bl

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="Llama-2-7B")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--groups", default="row,128")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--wide", action="store_true", help="sweep 5 BLOCK_N x 4 BLOCK_W x 3 warps x 2 stages (BLOCK_N x BLOCK_W <= 8192: 114 configs)")
    ap.add_argument("--sweep-seq", action="store_true",
                    help="time each sweep config as a graph of --layers copies of the shape (back to back, "
                         "no flush) instead of one flushed launch")
    ap.add_argument("--out", default="decode_gemv.json")
    args = ap.parse_args()
    sha = os.environ.get("LOWBIT_GIT_SHA") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "git_sha": sha, "model": args.model, "rows": [], "sequence": []}
    res["copy_gbps"] = bl.ceilings()["copy_gbps"]
    shapes = {name: MODEL_SHAPES[args.model][name] for name in LAYERS}
    groups = [None if g == "row" else int(g) for g in args.groups.split(",")]
    best_cfg: dict = {}
    with torch.inference_mode():
        # -- 1. per shape ------------------------------------------------------------------
        for name, (n, k) in shapes.items():
            q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
            packed = pack_int4(q)
            w16 = q.to(torch.bfloat16)
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            qa, sa = act_quant(x)
            wp, sz, _ = bl.tinygemm_weight(w16)
            base = {"tinygemm_g128": t_us(lambda: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz)),
                    "bf16": t_us(lambda: x @ w16.t())}
            for group in groups:
                g = group or k
                scale = (torch.rand(n, k // g, device="cuda") * 0.01).to(torch.bfloat16)
                wb = n * k / 2 + scale.numel() * 2
                row = {"shape": name, "N": n, "K": k, "group": group, **base,
                       "stream": t_us(lambda: w4a8_gemv_dp4a(x, packed, scale, None, g, kernel="stream")),
                       "q_rule": t_us(lambda: w4a8_gemv_q(qa, sa, packed, scale, None, g, torch.bfloat16)),
                       "q_rule_cfg": gemv_q_config(1, n, k, group or 0)}
                best = (row["q_rule"], row["q_rule_cfg"])
                if args.sweep_seq:  # compare back-to-back times with back-to-back times only
                    best = (float("inf"), None)
                copies = [(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")), scale)
                          for _ in range(args.layers)] if args.sweep_seq else None

                def timed(c):
                    if copies is None:
                        return t_us(lambda: w4a8_gemv_q(qa, sa, packed, scale, None, g, torch.bfloat16, config=c),
                                    rep=25)
                    return seq_us(lambda: [w4a8_gemv_q(qa, sa, p, s, None, g, torch.bfloat16, config=c)
                                           for p, s in copies]) / args.layers

                if copies is not None:
                    row["stream_seq"] = seq_us(lambda: [w4a8_gemv_dp4a(x, p, s, None, g, kernel="stream")
                                                        for p, s in copies]) / args.layers
                    row["q_rule_seq"] = timed(None)
                    best = (row["q_rule_seq"], row["q_rule_cfg"])
                    tgs = [bl.tinygemm_weight(torch.randint(-8, 8, (n, k), device="cuda").to(torch.bfloat16))[:2]
                           for _ in range(args.layers)]
                    row["tinygemm_seq"] = seq_us(lambda: [torch.ops.aten._weight_int4pack_mm(x, a, 128, b)
                                                          for a, b in tgs]) / args.layers
                if not args.no_sweep:
                    for c in WIDE if args.wide else CANDS:
                        if group and (c["BLOCK_W"] * 8) % group:
                            continue
                        try:
                            us = timed(c)
                        except Exception as e:  # noqa: BLE001 -- a config may not compile; listed
                            print(f"  fail {c}: {type(e).__name__}: {str(e)[:120]}")
                            continue
                        row.setdefault("sweep", []).append([c, round(us, 2)])
                        if us < best[0]:
                            best = (us, c)
                row.update(q_best=best[0], q_best_cfg=best[1], q_best_gbps=wb / best[0] / 1e3,
                           q_best_pct_copy=100 * wb / best[0] / 1e3 / res["copy_gbps"],
                           q_vs_tinygemm=row.get("tinygemm_seq", base["tinygemm_g128"]) / best[0],
                           stream_vs_tinygemm=row.get("tinygemm_seq", base["tinygemm_g128"])
                           / row.get("stream_seq", row["stream"]))
                best_cfg[(name, group)] = best[1]
                res["rows"].append(row)
                if copies is not None:
                    print(f"{name:13s} g={group}: back to back x{args.layers}: stream {row['stream_seq']:.1f}  "
                          f"q_rule {row['q_rule_seq']:.1f}  q_best {best[0]:.1f}  tinygemm {row['tinygemm_seq']:.1f} "
                          f"us each ({row['tinygemm_seq'] / best[0]:.2f}x)")
                print(f"{name:13s} g={group}: stream {row['stream']:.1f}  q_rule {row['q_rule']:.1f}  "
                      f"q_best {best[0]:.1f} {best[1]}  tinygemm {base['tinygemm_g128']:.1f}  bf16 {base['bf16']:.1f} us",
                      flush=True)
        # -- 2. the layer sequence -------------------------------------------------------------
        for group in groups:
            layers = []
            for _ in range(args.layers):
                for name, (n, k) in shapes.items():
                    g = group or k
                    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
                    layers.append(dict(name=name, k=k, g=g, packed=pack_int4(q),
                                       scale=(torch.rand(n, k // g, device="cuda") * 0.01).to(torch.bfloat16)))
            xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in {lay["k"] for lay in layers}}
            qs = {k: act_quant(x) for k, x in xs.items()}

            def run(path, cfg_of):
                def f():
                    for lay in layers:
                        x = xs[lay["k"]]
                        if path == "stream":
                            w4a8_gemv_dp4a(x, lay["packed"], lay["scale"], None, lay["g"], kernel="stream")
                        else:
                            qa, sa = act_quant(x) if path == "actq+q" else qs[lay["k"]]
                            w4a8_gemv_q(qa, sa, lay["packed"], lay["scale"], None, lay["g"], torch.bfloat16,
                                        config=cfg_of(lay))
                return f

            t = {"stream": seq_us(run("stream", None)),
                 "q_rule": seq_us(run("q", lambda lay: None)),
                 "q_best": seq_us(run("q", lambda lay: best_cfg[(lay["name"], group)])),
                 "actq+q_best": seq_us(run("actq+q", lambda lay: best_cfg[(lay["name"], group)]))}
            # tinygemm / bf16 sequences on the same shapes
            tg, bf = [], []
            for _ in range(args.layers):
                for n, k in shapes.values():
                    w16 = torch.randint(-8, 8, (n, k), device="cuda").to(torch.bfloat16)
                    wp, sz, _ = bl.tinygemm_weight(w16)
                    tg.append((k, wp, sz))
                    bf.append((k, w16))
            t["tinygemm_g128"] = seq_us(lambda: [torch.ops.aten._weight_int4pack_mm(xs[k], wp, 128, sz)
                                                 for k, wp, sz in tg])
            t["bf16"] = seq_us(lambda: [xs[k] @ w.t() for k, w in bf])
            per_layer = {p: v / args.layers for p, v in t.items()}
            res["sequence"].append({"group": group, "layers": args.layers, "us_total": t, "us_per_layer": per_layer,
                                    "x_tinygemm": {p: t["tinygemm_g128"] / v for p, v in t.items()}})
            print(f"sequence g={group} per layer (us): " + "  ".join(f"{p} {v:.1f}" for p, v in per_layer.items()),
                  flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print("\nsequence per layer, x vs tinygemm:")
    for s in res["sequence"]:
        print(f"  g={s['group']}: " + "  ".join(f"{p} {s['us_per_layer'][p]:.1f}us ({s['x_tinygemm'][p]:.2f}x)"
                                          for p in s["us_per_layer"]))


if __name__ == "__main__":
    main()
