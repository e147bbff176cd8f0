"""One linear layer y = x @ W^T on the GPU: lowbit's int4 paths vs the alternatives, side by side.

Usage (GPU machine):  python benchmarks/bench_linear.py [--quick] [--out FILE.json]
Timing: triton.testing.do_bench, median, L2 flushed between calls. Shapes from
lowbit.testing.shapes (Llama-2-7B + Llama-3-8B linears, distinct), M in BENCH_M.
Every column includes its own activation quantization where it has one
("alone" columns are the bare GEMM). Rows go to JSON with device, versions, git sha.
Peers when importable (PYTHONPATH from ../shared/tools/fetch-peers.sh): torchao int4 weight-only
(g128, its tinygemm layout) and, with --gemlite, gemlite's W4A16 g128.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import lowbit
from lowbit.bench import cuda_graphed, git_sha
from lowbit.testing.shapes import BENCH_M, MODEL_SHAPES
from lowbit.testing.sqnr import sqnr_db

# Eager timings are host-bound for every library whenever Python + launches exceed the GPU work
# (small M, and small layers even at M=2048), so every column is timed as CUDA-graph replays, as a
# compiled model runs; the eager time is kept in the JSON as us_eager.
GRAPH_MAX_M = 8192
LAYERS = ("qkv_proj", "o_proj", "k_proj", "gate_up_proj", "gate_proj", "down_proj")


def bench_shapes(quick: bool) -> list[tuple[str, int, int]]:
    seen, out = set(), []
    for model in ("Llama-2-7B", "Llama-3-8B"):
        for layer in LAYERS:
            nk = MODEL_SHAPES[model][layer]
            if nk not in seen:
                seen.add(nk)
                out.append((f"{model}:{layer}", *nk))
    return out[:2] if quick else out


def timeit(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median") * 1e3  # us


def timeit_graphed(fn) -> float:
    """GPU time without host launch overhead: replay a CUDA graph of fn (L2 still flushed)."""
    return timeit(cuda_graphed(fn))


GRAPHED_TIMING = "CUDA-graph replay, L2 flushed (do_bench median)"


def write_probe_json(path: str, rows: list, timing: str = GRAPHED_TIMING) -> None:
    """A probe's result file: {"meta": device, versions, git sha, timing; "rows": rows}."""
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git_sha": git_sha(), "timing": timing}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def ceilings() -> dict:
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src))
    a = torch.randint(-127, 127, (8192, 8192), dtype=torch.int8, device="cuda")
    ti = timeit(lambda: torch._int_mm(a, a.t()))
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    tb = timeit(lambda: b @ b.t())
    torch.cuda.empty_cache()
    return {"copy_gbps": 2 * 2**30 / t / 1e3, "int_mm_tops": 2 * 8192**3 / ti / 1e6,
            "bf16_tflops": 2 * 8192**3 / tb / 1e6}


def minmax_int4(w: torch.Tensor, group: int):
    """Asymmetric int4 per group of K: codes u in 0..15 (N, K) int32, w ~ u * scale + lo, scale and lo
    (N, K/group, 1) float32 (the peers' weight-only layouts are built from these)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    return ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k), scale, lo


def tinygemm_weight(w: torch.Tensor, group: int = 128):
    """torch's own int4 (tinygemm) layout: unsigned nibbles, [scale, zero] per group."""
    n, k = w.shape
    u, scale, lo = minmax_int4(w, group)
    zero = lo + 8 * scale  # w = (u - 8) * scale + zero
    packed_u8 = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)
    wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
    deq = ((u.reshape(n, k // group, group).float() - 8) * scale + zero).reshape(n, k)
    return wp, sz.to(torch.bfloat16), deq.to(torch.bfloat16)


def eager_int8_quant(x):
    s = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127
    return (x.float() / s).round().clamp(-127, 127).to(torch.int8), s


def eager_fp8_quant(x):
    s = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448
    return (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn), s


def build_impls(n: int, k: int, peers: dict) -> tuple[dict, dict]:
    """Return ({name: fn(x)}, {name: weight bytes})."""
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    impls, wbytes = {}, {}
    impls["bf16"] = lambda x: F.linear(x, w)
    wbytes["bf16"] = w.numel() * 2
    wp, sz, _ = tinygemm_weight(w)
    impls["torch_int4_tinygemm_g128"] = lambda x: torch.ops.aten._weight_int4pack_mm(x, wp, 128, sz)
    wbytes["torch_int4_tinygemm_g128"] = wp.numel() * 4 + sz.numel() * 2
    wq8, sw8 = eager_int8_quant(w)
    wq8_t = wq8.t()

    def int_mm_alone(x, qa_cache={}):
        key = x.shape[0]
        if key not in qa_cache:
            qa_cache.clear()
            qa_cache[key] = eager_int8_quant(x if x.shape[0] > 16 else F.pad(x, (0, 0, 0, 17 - x.shape[0])))[0]
        return torch._int_mm(qa_cache[key], wq8_t)

    impls["int_mm_alone"] = int_mm_alone
    wbytes["int_mm_alone"] = wq8.numel()

    def w8a8_eager(x):
        m = x.shape[0]
        xp = x if m > 16 else F.pad(x, (0, 0, 0, 17 - m))
        qa, sa = eager_int8_quant(xp)
        return (torch._int_mm(qa, wq8_t)[:m].float() * sa[:m] * sw8.t()).to(torch.bfloat16)

    impls["w8a8_eager_quant"] = w8a8_eager
    wbytes["w8a8_eager_quant"] = wq8.numel()
    wf8, swf8 = eager_fp8_quant(w)
    swf8_t = swf8.t().contiguous()

    def fp8_rowwise(x):
        qa, sa = eager_fp8_quant(x)
        return torch._scaled_mm(qa, wf8.t(), scale_a=sa, scale_b=swf8_t, out_dtype=torch.bfloat16)

    impls["fp8_rowwise_scaled_mm_eager_quant"] = fp8_rowwise
    wbytes["fp8_rowwise_scaled_mm_eager_quant"] = wf8.numel()
    for name, cfg in [
        ("lowbit_w4a8_g128", lowbit.W4A8Config(group_size=128)),
        ("lowbit_w4a8_row", lowbit.W4A8Config(group_size=None)),
        ("lowbit_int4wo_g128", lowbit.Int4WeightOnlyConfig(group_size=128)),
        ("lowbit_w8a8_row", lowbit.Int8DynamicActivationInt8WeightConfig()),
        ("lowbit_w8a8_row_triton", lowbit.Int8DynamicActivationInt8WeightConfig(kernel=lowbit.KernelChoice.TRITON)),
    ]:
        qw = cfg.quantize_weight(w)
        impls[name] = (lambda q: (lambda x: F.linear(x, q)))(qw)
        wbytes[name] = qw.nbytes_stored()
        if name.startswith("lowbit_w4a8"):
            for path in ("decode", "prefill"):
                impls[f"{name}_{path}"] = (lambda q, p: (lambda x: torch.ops.lowbit.int4_linear(
                    x, q.qdata, q.scale, None, None, q.group_size, False, True, p)))(qw, path)
                wbytes[f"{name}_{path}"] = qw.nbytes_stored()
    if cutlass_available():
        qw = lowbit.W4A8Config(group_size=None, kernel=lowbit.KernelChoice.CUTLASS).quantize_weight(w)
        impls["lowbit_w4a8_row_cutlass"] = lambda x: F.linear(x, qw)
        wbytes["lowbit_w4a8_row_cutlass"] = qw.nbytes_stored()
    if "torchao_quantize" in peers:
        try:
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            peers["torchao_quantize"](lin, peers["torchao_int4"](group_size=128, **peers["torchao_int4_kw"]))
            impls["torchao_int4wo_g128"] = lin
            wbytes["torchao_int4wo_g128"] = n * k // 2
        except Exception as e:  # report, keep going
            print(f"torchao int4wo unavailable for {n}x{k}: {type(e).__name__}: {e}")
    if "gemlite" in peers:
        # gemlite's W4A16 (bf16 x int4, g128, asymmetric: w = (q - zero) * scale)
        try:
            wq, ws, wz = hqq_weight(w, 128)
            impls["gemlite_a16w4_g128"] = peers["gemlite"].helper.A16W4_HQQ_INT(dtype=torch.bfloat16).from_weights(
                wq, ws, wz)
            wbytes["gemlite_a16w4_g128"] = n * k // 2 + ws.numel() * 2 + wz.numel() * 2
        except Exception as e:  # report, keep going
            print(f"gemlite_a16w4_g128 unavailable for {n}x{k}: {type(e).__name__}: {e}")
    return impls, wbytes


def hqq_weight(w: torch.Tensor, group: int):
    """gemlite's int4 input: uint8 codes 0..15 (N, K), scale and zero (N, K/group), w = (q - zero) * scale."""
    n = w.shape[0]
    u, scale, lo = minmax_int4(w, group)
    return u.to(torch.uint8), scale.reshape(n, -1).to(torch.bfloat16), (-lo / scale).reshape(n, -1).to(torch.bfloat16)


@functools.cache
def cutlass_available() -> bool:
    """The CUTLASS W4A8 column runs only where the extension builds (or is cached) on a CC 9.0 GPU."""
    from lowbit.kernels.cutlass import build

    reason = build.device_blocker(torch.device("cuda")) or build.build_blocker()
    if reason is None:
        try:
            build.load()
        except build.BuildError as e:
            reason = str(e)[-500:]
    if reason is not None:
        print(f"CUTLASS column skipped: {reason}")
    return reason is None


def check_correctness(impls: dict, n: int, k: int) -> dict:
    """SQNR of each lowbit path vs its own reference path at M=33 (odd)."""
    x = torch.randn(33, k, device="cuda", dtype=torch.bfloat16)
    out = {}
    ref_bf16 = impls["bf16"](x).float()
    for name, fn in impls.items():
        try:
            out[name] = round(sqnr_db(ref_bf16, fn(x).float()), 1)
        except Exception as e:
            out[name] = f"error: {type(e).__name__}: {e}"
    return out


def load_peers(with_gemlite: bool) -> dict:
    peers: dict = {}
    try:
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        # torchao >= 0.14's default int4 packing ("plain") needs the mslk package; its tinygemm layout does not
        fields = getattr(Int4WeightOnlyConfig, "__dataclass_fields__", {})
        kw = {"int4_packing_format": "tile_packed_to_4d"} if "int4_packing_format" in fields else {}
        peers.update(torchao_quantize=quantize_, torchao_int4=Int4WeightOnlyConfig, torchao_version=torchao.__version__,
                     torchao_int4_kw=kw)
    except Exception as e:
        print(f"torchao not importable: {type(e).__name__}: {e}")
    if with_gemlite:
        try:
            import gemlite

            peers.update(gemlite=gemlite, gemlite_version=gemlite.__version__)
        except Exception as e:
            print(f"gemlite not importable: {type(e).__name__}: {e}")
    return peers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/linear_h100.json")
    ap.add_argument("--m", type=int, nargs="*", default=list(BENCH_M))
    ap.add_argument("--gemlite", action="store_true",
                    help="add gemlite's W4A16 g128 column (autotunes on first use of each shape and M: minutes)")
    ap.add_argument("--summarize", nargs="+", metavar="JSON",
                    help="no GPU: print the issue's acceptance ratios from result files of this script")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    peers = load_peers(args.gemlite)
    sha = git_sha()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "git_sha": sha or "unknown",
            "torchao": peers.get("torchao_version"), "gemlite": peers.get("gemlite_version"),
            "torchao_int4_kw": peers.get("torchao_int4_kw"), "ceilings": ceilings()}
    print(json.dumps(meta))
    rows, checks = [], {}
    for label, n, k in bench_shapes(args.quick):
        impls, wbytes = build_impls(n, k, peers)
        checks[f"{n}x{k}"] = check_correctness(impls, n, k)
        print(f"sqnr vs bf16 {n}x{k}: {checks[f'{n}x{k}']}", flush=True)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for name, fn in impls.items():
                if name.endswith("_decode") and m > 2048:
                    continue
                if name.endswith("_prefill") and m < 16:
                    continue
                try:
                    eager = timeit(lambda: fn(x))
                    graphed = timeit_graphed(lambda: fn(x)) if m <= GRAPH_MAX_M else None
                except Exception as e:
                    print(f"{name} {n}x{k} M={m}: {type(e).__name__}: {e}")
                    continue
                us = graphed if graphed is not None else eager
                rows.append({"shape": label, "N": n, "K": k, "M": m, "impl": name, "us": round(us, 2),
                             "us_eager": round(eager, 2), "timing": "cuda_graph" if graphed else "eager",
                             "tflops": round(2 * m * n * k / us / 1e6, 1),
                             "weight_gbps": round(wbytes[name] / us / 1e3, 1),
                             "pct_copy_ceiling": round(100 * wbytes[name] / us / 1e3 / meta["ceilings"]["copy_gbps"], 1)})
        del impls
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "sqnr_vs_bf16": checks, "rows": rows}, indent=1))
    print_table(rows)


def summarize(paths: list[str]) -> None:
    """Acceptance ratios, each from the one run (file) that holds both of its times: AUTO W4A8 per row
    (and g128) vs bf16 and tinygemm at M=1 (with the weight read as % of the copy ceiling), vs bf16 at
    M=16, and vs bf16 and the bare `_int_mm` at M=2048/8192."""
    print("file | NxK | M | w4a8 row us | vs bf16 | vs tiny | % copy | g128 vs bf16 | g128 vs tiny | row vs _int_mm")
    for path in paths:
        data = json.loads(Path(path).read_text())
        by = {(r["N"], r["K"], r["M"], r["impl"]): r for r in data["rows"]}
        for n, k, m in sorted({(r["N"], r["K"], r["M"]) for r in data["rows"]}, key=lambda t: (t[2], t[0], t[1])):
            got = {i: by.get((n, k, m, i)) for i in ("bf16", "torch_int4_tinygemm_g128", "int_mm_alone",
                                                    "lowbit_w4a8_row", "lowbit_w4a8_g128")}
            if any(v is None for v in got.values()):
                continue
            bf, tiny, imm, row, g = (got[i]["us"] for i in got)
            print(f"{Path(path).name} | {n}x{k} | {m} | {row:.1f} | {bf / row:.2f}x | {tiny / row:.2f}x | "
                  f"{got['lowbit_w4a8_row']['pct_copy_ceiling']:.0f}% | {bf / g:.2f}x | {tiny / g:.2f}x | {imm / row:.2f}x")


def print_table(rows: list[dict]) -> None:
    cols = ["bf16", "torch_int4_tinygemm_g128", "int_mm_alone", "w8a8_eager_quant",
            "fp8_rowwise_scaled_mm_eager_quant", "torchao_int4wo_g128", "lowbit_int4wo_g128",
            "lowbit_w4a8_row", "lowbit_w4a8_g128"]
    short = ["bf16", "tiny", "intmm", "w8a8e", "fp8e", "ao_i4", "lb_i4", "w4a8r", "w4a8g"]
    if any(r["impl"] == "lowbit_w4a8_row_cutlass" for r in rows):
        cols, short = cols + ["lowbit_w4a8_row_cutlass"], short + ["w4a8rC"]
    cols, short = cols + ["lowbit_w8a8_row", "lowbit_w8a8_row_triton"], short + ["w8a8", "w8a8T"]
    if any(r["impl"].startswith("gemlite") for r in rows):
        cols, short = cols + ["gemlite_a16w4_g128"], short + ["gl_a16"]
    by = {(r["N"], r["K"], r["M"], r["impl"]): r["us"] for r in rows}
    print("NxK M | " + " ".join(f"{s:>7}" for s in short) + " | g128 vs bf16, vs tiny; row vs bf16")
    for n, k, m in sorted({(r["N"], r["K"], r["M"]) for r in rows}):
        vals = [by.get((n, k, m, c)) for c in cols]
        cells = " ".join(f"{v:7.1f}" if v else "      -" for v in vals)
        b, t, wr, wg = vals[0], vals[1], vals[7], vals[8]
        ratio = (f"{b / wg:5.2f}x {t / wg:5.2f}x; {b / wr:5.2f}x" if (b and t and wg and wr) else "")
        print(f"{n}x{k} {m} | {cells} | {ratio}")


if __name__ == "__main__":
    main()
