"""Probe: the prefill int8 GEMM with TMA operand loads and a persistent grid vs today's kernel.

One run on the GPU, every column timed as CUDA-graph replays under do_bench (L2 flushed, medians):
bf16 F.linear, torch._int_mm alone, today's int8_gemm (autotuned), int8_gemm_tma over a config
sweep (per row and g128), and the whole W4A8 prefill (act_quant + unpack + GEMM) with each GEMM.
Also times act_quant variants for long rows (K > 8192). Checks the TMA output against int8_gemm
bit for bit. Writes JSON (--out) and prints a table. `--part variants` times GROUP_M, group-wise
TMA configs and the prefill pipeline's pieces (act_quant, unpack, quant_and_unpack); its committed
result (results/probe_tma_variants_h100.json, sha c44b194) also swept two kernel options removed
since: an unflattened tile loop (2-8% slower) and a TMA-store epilogue (out of shared memory at 4
stages). `--part qu` sweeps quant_and_unpack's expansion block and warps (alone and with the GEMM).

    python benchmarks/probe_tma_gemm.py --out probe_tma_gemm.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from lowbit.bench import cuda_graphed, run_metadata
from lowbit.kernels.w4a8.act_quant import _act_quant_kernel, act_quant
from lowbit.kernels.w4a8.expand import quant_and_unpack, unpack_int4_triton
from lowbit.kernels.w4a8.prefill import int8_gemm, int8_gemm_tma

SHAPES = [(1024, 4096), (4096, 4096), (6144, 4096), (4096, 11008), (11008, 4096), (4096, 14336),
          (14336, 4096), (22016, 4096)]
MS = [2048, 8192]
CONFIGS = [  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
    (128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4), (128, 128, 128, 8, 4, 4), (128, 256, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 5), (256, 128, 64, 8, 8, 4), (64, 256, 128, 8, 4, 4),
]


def t_us(fn) -> float:
    return triton.testing.do_bench(cuda_graphed(fn), warmup=10, rep=40, return_mode="median") * 1e3


def cfg_dict(c, group):
    bm, bn, bk, gm, w, s = c
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": group or bk, "GROUP_M": gm, "num_warps": w,
            "num_stages": s}


def _meta() -> dict:
    meta = run_metadata(0.0, torch.cuda.get_device_name())
    meta.pop("total_seconds")
    meta["triton"] = triton.__version__
    return meta


def _layer(n: int, k: int):
    """Random packed int4 weight (N, K/2), its int8 expansion and a bf16 weight of the same shape."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    return packed, unpack_int4_triton(packed), torch.randn(n, k, device="cuda", dtype=torch.bfloat16)


def _acts(m: int, k: int):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return (x, *act_quant(x))


def act_quant_variant(x, block, warps, one_pass):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    _act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one_pass,
                            PERMUTE=False, TRIGGER=False, num_warps=warps)
    return q, s


VARIANT_SHAPES = [(1024, 4096), (4096, 4096), (6144, 4096), (4096, 11008), (4096, 14336), (22016, 4096)]
BEST = (128, 256, 128, 8, 8, 4)


def variants(res: dict) -> None:
    """Second part: epilogue / loop / grouping variants of the TMA GEMM, g128 unflattened, and the
    prefill pipeline's pieces (act_quant, unpack, both in one launch) with the TMA GEMM."""
    dev = "cuda"
    for n, k in VARIANT_SHAPES:
        packed, w8, w_bf = _layer(n, k)
        for m in MS:
            x, qa, sa = _acts(m, k)
            sw = torch.rand(n, 1, device=dev) + 0.5
            ref = int8_gemm(qa, sa, w8, sw, None, k, torch.bfloat16, tma=False)
            row: dict = {"N": n, "K": k, "M": m, "bf16": t_us(lambda: F.linear(x, w_bf)),
                         "int_mm_alone": t_us(lambda: torch._int_mm(qa, w8.t())), "variants": []}
            for gm in (4, 8, 16):
                cd = cfg_dict(BEST, 0)
                cd.update(GROUP_M=gm)
                try:
                    exact = bool(torch.equal(int8_gemm_tma(qa, sa, w8, sw, None, k, torch.bfloat16, cd), ref))
                    us = t_us(lambda: int8_gemm_tma(qa, sa, w8, sw, None, k, torch.bfloat16, cd))
                except Exception as e:  # noqa: BLE001
                    row["variants"].append({"cfg": cd, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                row["variants"].append({"cfg": cd, "us": us, "exact": exact})
            ok = [v for v in row["variants"] if v.get("exact")]
            best = min(ok, key=lambda v: v["us"])
            cd = best["cfg"]
            row["best_variant"] = best
            # g128: pointer kernel vs TMA flattened / not
            sg = torch.rand(n, k // 128, device=dev) + 0.5
            refg = int8_gemm(qa, sa, w8, sg, None, 128, torch.bfloat16, tma=False)
            row["g128_now"] = t_us(lambda: int8_gemm(qa, sa, w8, sg, None, 128, torch.bfloat16, tma=False))
            for c in [(128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 8, 4), (128, 128, 128, 8, 4, 4)]:
                cg = cfg_dict(c, 128)
                out = int8_gemm_tma(qa, sa, w8, sg, None, 128, torch.bfloat16, cg)
                row.setdefault("g128_tma", []).append(
                    {"cfg": cg, "exact": bool(torch.equal(out, refg)),
                     "us": t_us(lambda: int8_gemm_tma(qa, sa, w8, sg, None, 128, torch.bfloat16, cg))})
            # pieces
            row["act_quant"] = t_us(lambda: act_quant(x))
            row["act_quant_2048x8"] = t_us(lambda: act_quant_variant(x, 2048, 8, False)) if k > 8192 else None
            row["unpack"] = t_us(lambda: unpack_int4_triton(packed))
            row["quant_and_unpack"] = t_us(lambda: quant_and_unpack(x, packed))
            row["gemm_tma"] = t_us(lambda: int8_gemm_tma(qa, sa, w8, sw, None, k, torch.bfloat16, cd))

            def seq3():
                q, s = act_quant(x)
                return int8_gemm_tma(q, s, unpack_int4_triton(packed), sw, None, k, torch.bfloat16, cd)

            def seq2():
                q, s, w = quant_and_unpack(x, packed)
                return int8_gemm_tma(q, s, w, sw, None, k, torch.bfloat16, cd)

            row["w4a8_tma_3launch"] = t_us(seq3)
            row["w4a8_tma_2launch"] = t_us(seq2)
            row["exact_2launch"] = bool(torch.equal(seq2(), ref))
            res["variants"].append(row)
            bf = row["bf16"]
            print(f"{n}x{k} M={m}: bf16 {bf:.1f} int_mm {row['int_mm_alone']:.1f} | best {best['us']:.1f} "
                  f"GROUP_M={cd['GROUP_M']} | aq {row['act_quant']:.1f} "
                  f"aq2048x8 {row['act_quant_2048x8']} unpack {row['unpack']:.1f} q+u {row['quant_and_unpack']:.1f}"
                  f" | 3 launches {row['w4a8_tma_3launch']:.1f} ({bf / row['w4a8_tma_3launch']:.2f}x) 2 launches "
                  f"{row['w4a8_tma_2launch']:.1f} ({bf / row['w4a8_tma_2launch']:.2f}x) exact {row['exact_2launch']}"
                  f" | g128 now {row['g128_now']:.1f} tma "
                  + " ".join(f"{v['us']:.1f}{'' if v['exact'] else '!'}" for v in row["g128_tma"]), flush=True)


def qu_launch(res: dict, shapes, ms) -> None:
    """Third part: quant_and_unpack's expansion block and warps, alone and before the TMA GEMM."""
    from lowbit.kernels.w4a8.prefill import TMA_CONFIG

    dev = "cuda"
    for n, k in shapes:
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
        w_bf = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        sw = torch.rand(n, 1, device=dev) + 0.5
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = quant_and_unpack(x, packed)
            row: dict = {"N": n, "K": k, "M": m, "bf16": t_us(lambda: F.linear(x, w_bf)), "launch": []}
            for ublock in (2048, 4096, 8192, 16384):
                for warps in (4, 8, 16):
                    got = quant_and_unpack(x, packed, ublock, warps)
                    exact = all(torch.equal(a, b) for a, b in zip(got, ref))
                    alone = t_us(lambda: quant_and_unpack(x, packed, ublock, warps))

                    def full():
                        q, s, w = quant_and_unpack(x, packed, ublock, warps)
                        return int8_gemm_tma(q, s, w, sw, None, k, torch.bfloat16, TMA_CONFIG)

                    row["launch"].append({"ublock": ublock, "warps": warps, "exact": exact, "alone_us": alone,
                                          "w4a8_us": t_us(full)})
            res["qu"].append(row)
            best = min(row["launch"], key=lambda r: r["w4a8_us"])
            print(f"{n}x{k} M={m}: bf16 {row['bf16']:.1f} | "
                  + " ".join(f"{r['ublock']}/{r['warps']}:{r['alone_us']:.1f}/{r['w4a8_us']:.1f}"
                             f"{'' if r['exact'] else '!'}" for r in row["launch"])
                  + f" | best {best['ublock']}/{best['warps']} {row['bf16'] / best['w4a8_us']:.3f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_tma_gemm.json")
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--ms", default=None)
    ap.add_argument("--part", default="sweep", choices=["sweep", "variants", "qu"])
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    if args.part == "qu":
        res3: dict = {"meta": _meta(), "qu": []}
        qu_launch(res3, shapes, ms)
        with open(args.out, "w") as f:
            json.dump(res3, f, indent=1)
        return
    if args.part == "variants":
        res2: dict = {"meta": _meta(), "variants": []}
        variants(res2)
        with open(args.out, "w") as f:
            json.dump(res2, f, indent=1)
        return
    res: dict = {"meta": _meta(), "rows": [], "act_quant": []}
    dev = "cuda"
    torch.manual_seed(0)
    table = []
    for n, k in shapes:
        packed, w8, w_bf = _layer(n, k)
        for m in ms:
            x, qa, sa = _acts(m, k)
            row = {"N": n, "K": k, "M": m}
            row["bf16"] = t_us(lambda: F.linear(x, w_bf))
            row["int_mm_alone"] = t_us(lambda: torch._int_mm(qa, w8.t()))
            for g in (0, 128):
                sw = torch.rand(n, k // g if g else 1, device=dev) + 0.5
                tag = f"g{g}" if g else "row"
                ref = int8_gemm(qa, sa, w8, sw, None, g or k, torch.bfloat16, tma=False)
                row[f"gemm_{tag}"] = t_us(lambda: int8_gemm(qa, sa, w8, sw, None, g or k, torch.bfloat16, tma=False))
                best = None
                sweep = []
                for c in CONFIGS:
                    if g and c[2] != 128:
                        continue
                    cd = cfg_dict(c, g)
                    try:
                        out = int8_gemm_tma(qa, sa, w8, sw, None, g or k, torch.bfloat16, cd)
                        exact = bool(torch.equal(out, ref))
                        us = t_us(lambda: int8_gemm_tma(qa, sa, w8, sw, None, g or k, torch.bfloat16, cd))
                    except Exception as e:  # noqa: BLE001 -- a config that does not compile is a data point
                        sweep.append({"cfg": c, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    sweep.append({"cfg": c, "us": us, "exact": exact})
                    if exact and (best is None or us < best[0]):
                        best = (us, c)
                row[f"tma_sweep_{tag}"] = sweep
                if best:
                    row[f"tma_{tag}"], row[f"tma_cfg_{tag}"] = best
                    cd = cfg_dict(best[1], g)

                    def full_tma():
                        q, s = act_quant(x)
                        return int8_gemm_tma(q, s, unpack_int4_triton(packed), sw, None, g or k,
                                             torch.bfloat16, cd)

                    row[f"w4a8_tma_{tag}"] = t_us(full_tma)

                def full_now():
                    q, s = act_quant(x)
                    return int8_gemm(q, s, unpack_int4_triton(packed), sw, None, g or k, torch.bfloat16, tma=False)

                row[f"w4a8_now_{tag}"] = t_us(full_now)
            res["rows"].append(row)
            bf = row["bf16"]
            line = (f"{n}x{k} M={m}: bf16 {bf:.1f} int_mm {row['int_mm_alone']:.1f} | row gemm now "
                    f"{row['gemm_row']:.1f} tma {row.get('tma_row', float('nan')):.1f} | w4a8 row now "
                    f"{row['w4a8_now_row']:.1f} ({bf / row['w4a8_now_row']:.2f}x) tma "
                    f"{row.get('w4a8_tma_row', float('nan')):.1f} ({bf / row.get('w4a8_tma_row', float('nan')):.2f}x)"
                    f" | g128 now {row['w4a8_now_g128']:.1f} ({bf / row['w4a8_now_g128']:.2f}x) tma "
                    f"{row.get('w4a8_tma_g128', float('nan')):.1f} "
                    f"({bf / row.get('w4a8_tma_g128', float('nan')):.2f}x)")
            print(line, flush=True)
            table.append(line)
    # -- act_quant for long rows ----------------------------------------------------------
    for k in (11008, 14336):
        for m in (2048, 8192):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref_q, ref_s = act_quant(x)
            for block, warps, one_pass in [(4096, 4, False), (2048, 4, False), (2048, 8, False),
                                           (8192, 8, False), (4096, 8, False), (16384, 16, True),
                                           (16384, 32, True)]:
                q, s = act_quant_variant(x, block, warps, one_pass)
                exact = bool(torch.equal(q, ref_q) and torch.equal(s, ref_s))
                us = t_us(lambda: act_quant_variant(x, block, warps, one_pass))
                res["act_quant"].append({"K": k, "M": m, "block": block, "warps": warps, "one_pass": one_pass,
                                         "us": us, "exact": exact})
                print(f"act_quant K={k} M={m} block={block} warps={warps} one_pass={one_pass}: {us:.1f} us"
                      f" exact={exact}", flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(table))


if __name__ == "__main__":
    main()
