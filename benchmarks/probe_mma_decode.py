"""Probe: the mma.sync W4A8 decode kernel (csrc/cutlass_w4a8/w4a8_mma.cu) next to today's paths.

Checks the kernel against the reference on odd shapes first (exact match expected: integer
accumulation, the reference's order of float roundings), then times, per Llama shape and token
count, CUDA-graph replays with L2 flushed (bench_linear's timing):
  mma_q      the mma kernel from int8 activations (what a compiled graph pays: Inductor quantizes)
  mma        act_quant + the mma kernel, plain launches
  mma_pdl    the same with programmatic dependent launch (act_quant triggers; the kernel streams
             its first weights before waiting for the activations): what an eager AUTO call runs
  auto       F.linear on today's W4A8 per-row weight (KernelChoice.AUTO)
  triton_auto  the same with kernel=TRITON (what AUTO runs without the native extension)
  cutlass_q  the CUTLASS kernel from int8 activations
  triton_q   the Triton int8 decode kernel from int8 activations (M >= 2)
  bf16, tinygemm_g128
and sweeps warps_n x split for mma_q at M = 1 and 16. `--act-quant` times act_quant's launch
configs at decode batch sizes instead (BLOCK_K, one pass or two, warps). `--depth` checks every load
depth (weight rounds in flight) for exactness and sweeps warps_n x split x depth for mma_q per
shape (per row, or `--group-size`), next to bf16 and the launcher's default.

    python benchmarks/probe_mma_decode.py [--out results/probe_mma_decode_h100.json]

The committed depth and launch-rule results came from (one H100 run each):
    --depth --ms 1,16,32 --warps 4,8 --splits 1,2,4,8 --depths 1,2,3   probe_mma_decode_depth_h100.json
    --depth --timings --ms 16,32                                       probe_mma_decode_depth2_h100.json
    --depth --group-size 128 --ms 1,16,32 --warps 8,16             probe_mma_decode_depth_g128_h100.json
    --no-sweep [--group-size 128]            probe_mma_decode_w16_h100.json, ..._w16_g128_h100.json,
                                             ..._final_g128_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from bench_linear import bench_shapes, timeit_graphed, tinygemm_weight

import lowbit
from lowbit.bench import git_sha
from lowbit.core.kernel_choice import KernelChoice
from lowbit.kernels.cutlass import build
from lowbit.kernels.cutlass.w4a8 import gemm as cutlass_gemm
from lowbit.kernels.cutlass.w4a8 import mma_gemm
from lowbit.kernels.w4a8.act_quant import act_quant
from lowbit.kernels.w4a8.decode import w4_decode
from lowbit.kernels.w4a8.reference import int8_gemm_ref, unpack_ref

MS = (1, 2, 4, 8, 16, 32)


def random_weight(n: int, k: int, dev="cuda"):
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    scale = torch.rand(n, 1, device=dev) * 0.01 + 1e-3
    return packed, scale


def check(depths: tuple[int, ...] = (0,)) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    cases = [(8, 32), (40, 160), (136, 4192), (1000, 1056), (4096, 4096), (24, 11008)]
    for (n, k), m, dt, bias, (wn, sp), dp in itertools.product(
            cases, (1, 3, 7, 16, 17, 32), (torch.bfloat16, torch.float16), (False, True),
            ((0, 0), (4, 1), (8, 3), (4, 8), (16, 2)), depths):
        steps = -(-k // 128)
        if sp > steps:
            continue
        packed, scale = random_weight(n, k)
        x = torch.randn(m, k, device="cuda", dtype=dt)
        pdl = m % 2 == 1  # odd token counts: launched after a triggering act_quant with PDL
        qa, sa = act_quant(x, trigger_dependents=pdl)
        b = torch.randn(n, device="cuda", dtype=dt) if bias else None
        try:
            out = mma_gemm(qa, sa, packed, scale, b, dt, 0, wn, sp, dp, pdl=pdl)
        except RuntimeError as e:  # a split below the shared-memory minimum is refused
            assert "split must be" in str(e), e
            continue
        ref = int8_gemm_ref(qa, sa, unpack_ref(packed), scale, b, k, dt)
        diff = (out.float() - ref.float()).abs().max().item()
        rows.append({"n": n, "k": k, "m": m, "dtype": str(dt), "bias": bias, "warps_n": wn, "split": sp,
                     "depth": dp, "pdl": pdl, "exact": bool(torch.equal(out, ref)), "max_abs_diff": diff})
    bad = [r for r in rows if not r["exact"]]
    print(f"check: {len(rows) - len(bad)}/{len(rows)} exact; worst {max(r['max_abs_diff'] for r in rows):.3g}")
    for r in bad[:10]:
        print("  not exact:", r)
    return rows


def timings(sweep: bool, group: int | None = None, ms: tuple[int, ...] = MS) -> list[dict]:
    rows = []
    for label, n, k in bench_shapes(False):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        qw = lowbit.W4A8Config(group_size=group).quantize_weight(w)
        qw_triton = lowbit.W4A8Config(group_size=group, kernel=KernelChoice.TRITON).quantize_weight(w)
        packed, scale = qw.qdata, qw.scale
        g = qw.group_size
        wp, sz, _ = tinygemm_weight(w)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            qa, sa = act_quant(x)
            t = {
                "mma_q": timeit_graphed(lambda: mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, g)),
                "mma": timeit_graphed(lambda: mma_gemm(*act_quant(x), packed, scale, None, torch.bfloat16, g)),
                "mma_pdl": timeit_graphed(lambda: mma_gemm(*act_quant(x, trigger_dependents=True), packed, scale,
                                                           None, torch.bfloat16, g, pdl=True)),
                "auto": timeit_graphed(lambda: F.linear(x, qw)),
                "triton_auto": timeit_graphed(lambda: F.linear(x, qw_triton)),
                "bf16": timeit_graphed(lambda: F.linear(x, w)),
                "tinygemm_g128": timeit_graphed(lambda: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz)),
            }
            if g == k:  # the CUTLASS GEMM takes per-row scales only
                t["cutlass_q"] = timeit_graphed(lambda: cutlass_gemm(qa, sa, packed, scale, None, torch.bfloat16))
            if m >= 2:
                t["triton_q"] = timeit_graphed(
                    lambda: w4_decode(qa, sa, packed, scale, None, None, g, torch.bfloat16))
            row = {"shape": label, "N": n, "K": k, "M": m, "us": t,
                   "mma_weight_gbps": n * k / 2 / t["mma_q"] / 1e3}
            rows.append(row)
            print(f"{label:28s} M={m:3d} " + " ".join(f"{a}={b:6.1f}" for a, b in t.items()), flush=True)
            if sweep and m in (1, 16) and g == k:
                cfgs = {}
                for wn, sp in itertools.product((4, 8), (1, 2, 4, 8)):
                    try:
                        mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, 0, wn, sp)
                    except RuntimeError:
                        continue
                    cfgs[f"w{wn}s{sp}"] = timeit_graphed(
                        lambda: mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, 0, wn, sp))
                row["sweep"] = cfgs
                print("   sweep: " + " ".join(f"{a}={b:.1f}" for a, b in cfgs.items()), flush=True)
    return rows


def depth_sweep(group: int | None, ms: tuple[int, ...], warps: tuple[int, ...] = (4, 8, 16),
                splits: tuple[int, ...] = (1, 2, 3, 4, 8), depths: tuple[int, ...] = (1, 2), pdl: bool = False,
                shapes: tuple[str, ...] = ()) -> list[dict]:
    """pdl: time act_quant (triggering) + the kernel launched with PDL instead of the kernel from int8."""
    rows = []
    for label, n, k in bench_shapes(False):
        if shapes and f"{n}x{k}" not in shapes:
            continue
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        qw = lowbit.W4A8Config(group_size=group).quantize_weight(w)
        packed, scale, g = qw.qdata, qw.scale, qw.group_size
        gs = 0 if g == k else g
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            qa, sa = act_quant(x)
            ref = mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, gs, 8, 0, 1)
            t = {"bf16": timeit_graphed(lambda: F.linear(x, w)),
                 "default": timeit_graphed(lambda: mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, gs)),
                 "default_pdl": timeit_graphed(lambda: mma_gemm(*act_quant(x, trigger_dependents=True), packed,
                                                                scale, None, torch.bfloat16, gs, pdl=True)),
                 "auto": timeit_graphed(lambda: F.linear(x, qw))}
            cfgs = {}
            for wn, sp, dp in itertools.product(warps, splits, depths):
                try:
                    out = mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, gs, wn, sp, dp)
                except RuntimeError:
                    continue
                assert torch.equal(out, ref) if not gs else torch.allclose(out, ref, rtol=1e-2, atol=1e-2), \
                    (label, m, wn, sp, dp)
                if pdl:
                    cfgs[f"w{wn}s{sp}d{dp}"] = timeit_graphed(lambda: mma_gemm(
                        *act_quant(x, trigger_dependents=True), packed, scale, None, torch.bfloat16, gs, wn, sp, dp,
                        pdl=True))
                else:
                    cfgs[f"w{wn}s{sp}d{dp}"] = timeit_graphed(
                        lambda: mma_gemm(qa, sa, packed, scale, None, torch.bfloat16, gs, wn, sp, dp))
            best = min(cfgs, key=cfgs.get)
            rows.append({"shape": label, "N": n, "K": k, "M": m, "us": t, "sweep": cfgs, "best": best})
            by_depth = {d: min(v for c, v in cfgs.items() if c.endswith(f"d{d}")) for d in depths}
            print(f"{label:26s} M={m:2d} bf16={t['bf16']:5.1f} default={t['default']:5.1f} "
                  f"pdl={t['default_pdl']:5.1f} auto={t['auto']:5.1f} "
                  f"best={best}:{cfgs[best]:5.1f} by depth " +
                  " ".join(f"d{d}={v:5.1f}" for d, v in by_depth.items()), flush=True)
    return rows


def act_quant_configs() -> list[dict]:
    from lowbit.kernels.w4a8.act_quant import _act_quant_kernel, act_quant_launch

    rows = []
    for k in (4096, 11008, 14336):
        for m in (1, 4, 16, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q = torch.empty(m, k, dtype=torch.int8, device="cuda")
            s = torch.empty(m, 1, device="cuda")
            ref = act_quant(x)
            cands = {"current": act_quant_launch(k, m)}
            for block, one, w in ((16384, True, 8), (16384, True, 16), (8192, True, 8), (4096, True, 8),
                                  (2048, False, 8), (4096, False, 8)):
                if block >= k or not one:
                    cands[f"b{block}{'' if one else '_2pass'}w{w}"] = (block, one, w)
            t = {}
            for name, (block, one, w) in cands.items():
                def run(block=block, one=one, w=w):
                    _act_quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=block, ONE_PASS=one,
                                            PERMUTE=False, TRIGGER=False, num_warps=w)
                run()
                assert torch.equal(q, ref[0]) and torch.equal(s, ref[1]), name
                t[name] = timeit_graphed(run)
            rows.append({"K": k, "M": m, "us": t, "current": cands["current"]})
            print(f"act_quant K={k} M={m}: " + " ".join(f"{a}={b:.1f}" for a, b in t.items()), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--act-quant", action="store_true")
    ap.add_argument("--depth", action="store_true")
    ap.add_argument("--ms", default="16,32", help="token counts of the --depth sweep")
    ap.add_argument("--warps", default="4,8,16", help="warps per CTA in the --depth sweep")
    ap.add_argument("--splits", default="1,2,3,4,8", help="K splits in the --depth sweep")
    ap.add_argument("--depths", default="1,2", help="load depths in the --depth sweep")
    ap.add_argument("--timings", action="store_true", help="with --depth: also the default-launch table")
    ap.add_argument("--pdl", action="store_true", help="with --depth: time act_quant + the kernel under PDL")
    ap.add_argument("--shapes", default="", help="with --depth: only these NxK shapes (comma list)")
    ap.add_argument("--timing-ms", default=",".join(map(str, MS)), help="token counts of the timing table")
    ap.add_argument("--group-size", type=int, default=0, help="0 = per row (default), else e.g. 128")
    args = ap.parse_args()
    if args.act_quant:
        rows = act_quant_configs()
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "git_sha": git_sha()}, "act_quant": rows}, f, indent=1)
        return
    build.load()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "git_sha": git_sha(),
            "timing": "CUDA-graph replay, L2 flushed (do_bench median)"}
    meta["group_size"] = args.group_size or None
    if args.depth:
        def ints(csv: str) -> tuple[int, ...]:
            return tuple(int(v) for v in csv.split(","))

        ms = ints(args.ms)
        result = {"meta": meta, "check": check((1, 2, 3)), "rows": depth_sweep(
            args.group_size or None, ms, ints(args.warps), ints(args.splits), ints(args.depths), args.pdl,
            tuple(v for v in args.shapes.split(",") if v))}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        if not args.timings:
            return
        result["timings"] = timings(False, args.group_size or None)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    tms = tuple(int(v) for v in args.timing_ms.split(","))
    result = {"meta": meta, "check": check(), "rows": timings(not args.no_sweep, args.group_size or None, tms)}
    print("\n| shape | M | mma_q | mma | mma_pdl | auto | cutlass_q | triton_q | bf16 | tinygemm | bf16/mma_pdl "
          "| bf16/auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        t = r["us"]
        print(f"| {r['shape']} | {r['M']} | {t['mma_q']:.1f} | {t['mma']:.1f} | {t['mma_pdl']:.1f} | {t['auto']:.1f} | "
              f"{t.get('cutlass_q', float('nan')):.1f} | {t.get('triton_q', float('nan')):.1f} | {t['bf16']:.1f} | "
              f"{t['tinygemm_g128']:.1f} | {t['bf16'] / t['mma_pdl']:.2f} | {t['bf16'] / t['auto']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
