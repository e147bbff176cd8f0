"""`bench_sparsity.py --speed`: 2:4 kernels vs dense at Llama MLP shapes on a CUDA GPU (run it through
bench_sparsity.py; this module holds the study so that script stays readable)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from lowbit import Int8DynamicActivationInt8WeightConfig, SemiSparseConfig
from lowbit.bench import git_sha
from lowbit.formats.int8 import TRITON_MIN_TOKENS
from lowbit.sparsity import Int8DynamicActivationSemiSparseInt8WeightConfig as Int8DQ24

MLP_SHAPES = [(11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)]  # (N, K)
SPEED_M = (1, 16, 128, 2048, 8192)
# NOTE: every column is timed as CUDA-graph replays (GPU time). torch._cslt_sparse_mm also sets up
# its cuSPARSELt plan on the host at every eager call: at M=2048 that host time exceeded the 2:4
# kernel itself (eager sparse bf16 468 us vs 182 us on the GPU at 11008x4096: results/sparsity_speed_
# eager_prefill_h100.json vs results/probe_cslt_m2048_h100.json), so
# from EAGER_ALSO_MIN_M the four main columns are timed eagerly as well (`*_eager_us`): what a
# prefill outside CUDA graphs pays.
EAGER_ALSO_MIN_M = 2048
EAGER_COLUMNS = ("dense_bf16", "sparse_bf16", "dense_int8dq", "sparse_int8dq")

# ---------------------------------------------------------------------------------------------
# speed (GPU)
# ---------------------------------------------------------------------------------------------
# Columns: the dense formats, lowbit's 2:4 formats as they run (searched cuSPARSELt algorithm),
# with cuSPARSELt's default algorithm (alg0), two other operand layouts (searched; timed while
# --budget allows): flipped = the other result layout than lowbit's default at that M ((N, M)
# returned as a transposed view below backends.NM_RESULT_MIN_TOKENS, (M, N) row-major from there),
# xcopy = x^T copied to a contiguous operand first (timed) -- and lowbit's
# dense path of the 2:4 weight (decompress per call + dense GEMM: what AUTO runs below *_MIN_TOKENS).
FORMATS = ("bf16", "int8dq")
VARIANTS = ("flipped", "xcopy")
TARGET = {"bf16": 1.1, "int8dq": 1.15}
LAYOUT = {"xcopy": {"contiguous_dense": True}}


def _layout(variant: str | None, padded_m: int) -> dict:
    """cusparselt_mm's layout arguments for a column (None: lowbit's default)."""
    from lowbit.sparsity import backends

    default = padded_m < backends.NM_RESULT_MIN_TOKENS  # transpose_result
    if variant == "flipped":
        return {"transpose_result": not default}
    return {"transpose_result": default} | LAYOUT.get(variant or "", {})


def _timeit(fn, graphed: bool) -> tuple[float, bool]:
    """(median us, whether it ran as a CUDA-graph replay): eager when capture fails. The eager
    call before capture is where a 2:4 call searches its cuSPARSELt algorithm (never in capture)."""
    import triton

    fn()  # eager first: a new token bucket's algorithm search stays out of every timed call
    torch.cuda.synchronize()
    if graphed:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn, graphed = g.replay, True
        except Exception:
            torch.cuda.synchronize()
            graphed = False
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3, graphed


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _columns(fmt: str) -> list[str]:
    return (
        [f"dense_{fmt}", f"sparse_{fmt}", f"sparse_{fmt}_alg0"]
        + [f"sparse_{fmt}_{v}" for v in VARIANTS]
        + [f"sparse_{fmt}_dense_path"]
    )


TABLE = [
    c
    for f in FORMATS
    for c in (
        f"dense_{f}_us",
        f"sparse_{f}_alg0_us",
        f"sparse_{f}_us",
        f"sparse_{f}_speedup",
        f"sparse_{f}_alg0_speedup",
    )
]


def print_table(rows: list[dict]) -> None:
    print("| N x K | M | " + " | ".join(c.removesuffix("_us") for c in TABLE) + " |  (times in us)")
    print("|" + " --- |" * (len(TABLE) + 2))
    for r in rows:
        print(f"| {r['N']}x{r['K']} | {r['M']} | " + " | ".join(_fmt(r.get(c)) for c in TABLE) + " |")


def _impls(n: int, k: int) -> tuple[dict, dict]:
    """Callables x -> y for one (N, K), and the reference each is checked against."""
    from lowbit.core.primitives import quantize_per_token_sym
    from lowbit.core.qtype import INT8_SYM
    from lowbit.formats.int8 import _int_mm_padded
    from lowbit.sparsity import backends, prune_24

    w = prune_24(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    bf16_24 = SemiSparseConfig(kernel="torch").quantize_weight(w)
    bf16_dense_path = SemiSparseConfig(kernel="reference").quantize_weight(w)  # decompress + cuBLAS
    i8 = Int8DynamicActivationInt8WeightConfig(kernel="torch").quantize_weight(w)
    i8_24 = Int8DQ24(kernel="torch").quantize_weight(w)
    i8_24_ref = Int8DQ24(kernel="reference").quantize_weight(w)

    def i8_24_dense_path(x):  # what AUTO runs below INT8_SEMI_SPARSE_MIN_TOKENS
        qx, sx = quantize_per_token_sym(x, INT8_SYM)
        acc = _int_mm_padded(qx, i8_24.dense_values()).float()
        return (acc * sx * i8_24.scale.t()).to(x.dtype)

    def i8_24_layout(x, **layout):  # SemiSparseInt8Tensor's bf16 path with another operand layout
        qx, sx = quantize_per_token_sym(x, INT8_SYM)
        acc = backends.cusparselt_mm(
            i8_24.packed, qx, alpha=i8_24.scale.reshape(-1), out_dtype=x.dtype, **layout
        )
        return (acc * sx).to(x.dtype)

    def alg0(f):
        def run(x):
            with backends.algorithm_search(False):
                return f(x)

        return run

    impls = {  # name: (x -> y, the name of the path it is checked against)
        "dense_bf16": (lambda x: F.linear(x, w), None),
        "sparse_bf16": (lambda x: F.linear(x, bf16_24), "dense_bf16"),
        "sparse_bf16_alg0": (alg0(lambda x: F.linear(x, bf16_24)), "dense_bf16"),
        "sparse_bf16_dense_path": (lambda x: F.linear(x, bf16_dense_path), "dense_bf16"),
        "dense_int8dq": (lambda x: F.linear(x, i8), "int8_ref"),
        "sparse_int8dq": (lambda x: F.linear(x, i8_24), "int8_ref"),
        "sparse_int8dq_alg0": (alg0(lambda x: F.linear(x, i8_24)), "int8_ref"),
        "sparse_int8dq_dense_path": (i8_24_dense_path, "int8_ref"),
    }
    for v in VARIANTS:
        impls[f"sparse_bf16_{v}"] = (
            lambda x, v=v: backends.cusparselt_mm(bf16_24.packed, x, **_layout(v, _padded(x))),
            "dense_bf16",
        )
        impls[f"sparse_int8dq_{v}"] = (lambda x, v=v: i8_24_layout(x, **_layout(v, _padded(x, 8))), "int8_ref")
    return {k: f for k, (f, _) in impls.items()} | {"int8_ref": lambda x: F.linear(x, i8_24_ref)}, {
        k: r for k, (_, r) in impls.items()
    }


def _padded(x: torch.Tensor, bits: int = 16) -> int:
    """The token count cusparselt_mm pads x's rows to (no tensor op: this runs inside timed graphs)."""
    from lowbit.sparsity import backends

    mult, floor = backends.PAD_MULTIPLE[bits], backends.PAD_FLOOR[bits]
    return max(floor, -(-x.shape[0] // mult) * mult)


def _algo(n: int, k: int, m: int, fmt: str, variant: str | None) -> dict | None:
    """The cuSPARSELt algorithm the searched column ran (from lowbit's cache)."""
    from lowbit.sparsity import backends

    dtype = torch.int8 if fmt == "int8dq" else torch.bfloat16
    padded = backends.pad_tokens(torch.empty(m, 1, dtype=dtype)).shape[0]
    tokens = backends.token_bucket(padded)
    layout = {"contiguous_dense": False} | _layout(variant, padded)
    for key, algo in backends.algorithm_cache().items():
        if (key.n, key.k, key.tokens, key.dtype, key.transpose_result, key.dense_contiguous) == (
            n,
            k,
            tokens,
            dtype,
            layout["transpose_result"],
            layout["contiguous_dense"],
        ):
            return algo._asdict()
    return None


def _first_winning_m(rows: list[dict], ms, faster, slower) -> int | None:
    """Smallest swept M from which `faster` beats `slower` on every row at every larger M."""
    wins = {
        m: all((r.get(faster) or 1e30) < (r.get(slower) or 1e30) for r in rows if r["M"] == m) for m in ms
    }
    return next((m for m in ms if all(wins[x] for x in ms if x >= m)), None)


def crossovers(rows: list[dict], ms) -> dict:
    from lowbit.sparsity import backends

    out: dict = {}
    for fmt, const in (("bf16", "SEMI_SPARSE_MIN_TOKENS"), ("int8dq", "INT8_SEMI_SPARSE_MIN_TOKENS")):
        shapes = sorted({(r["N"], r["K"]) for r in rows})
        vs_dense = {
            f"{n}x{k}": _first_winning_m(
                [r for r in rows if (r["N"], r["K"]) == (n, k)], ms, f"sparse_{fmt}_us", f"dense_{fmt}_us"
            )
            for n, k in shapes
        }
        out[fmt] = {
            "vs_dense_first_winning_M": vs_dense,
            "vs_dense_first_winning_M_all_shapes": _first_winning_m(
                rows, ms, f"sparse_{fmt}_us", f"dense_{fmt}_us"
            ),
            "alg0_vs_dense_first_winning_M_all_shapes": _first_winning_m(
                rows, ms, f"sparse_{fmt}_alg0_us", f"dense_{fmt}_us"
            ),
            const: {
                "current": getattr(backends, const),
                "measured_first_winning_M": _first_winning_m(
                    rows, ms, f"sparse_{fmt}_us", f"sparse_{fmt}_dense_path_us"
                ),
            },
            "min_speedup_at_M>=2048": min(
                (
                    r[f"sparse_{fmt}_speedup"]
                    for r in rows
                    if r["M"] >= 2048 and r.get(f"sparse_{fmt}_speedup")
                ),
                default=None,
            ),
        }
        out[fmt]["eager_min_speedup_at_M>=2048"] = min(
            (r[f"sparse_{fmt}_eager_speedup"] for r in rows if r.get(f"sparse_{fmt}_eager_speedup")),
            default=None,
        )
        c = out[fmt]
        # The bar: 2:4 beats dense by this much at M >= 2048 on every Llama MLP shape.
        c["target_speedup_at_M>=2048"] = TARGET[fmt]
        c["meets_target"] = (
            c["min_speedup_at_M>=2048"] is not None and c["min_speedup_at_M>=2048"] >= TARGET[fmt]
        )
        print(
            f"{fmt}: 2:4 (searched) beats dense from M={c['vs_dense_first_winning_M_all_shapes']} on every "
            f"shape (alg 0: M={c['alg0_vs_dense_first_winning_M_all_shapes']}); per shape {vs_dense}; "
            f"min speedup at M>=2048: {c['min_speedup_at_M>=2048']} (target {TARGET[fmt]}: "
            f"{'met' if c['meets_target'] else 'NOT met'}; eager: {c['eager_min_speedup_at_M>=2048']}); "
            f"{const}: the 2:4 kernel beats "
            f"the dense path from M={c[const]['measured_first_winning_M']} on"
        )
    return out


def run_speed(args: argparse.Namespace) -> dict | None:
    """The --speed study (see bench_sparsity.py); the result to write, None without a GPU."""
    import triton

    from lowbit.sparsity import backends, cslt_algorithms, speed
    from lowbit.testing.sqnr import sqnr_db

    if not torch.cuda.is_available():
        print("--speed needs a CUDA GPU", file=sys.stderr)
        return None
    torch.manual_seed(0)
    shapes = MLP_SHAPES[:1] if args.quick else MLP_SHAPES
    ms = (1, 128, 2048) if args.quick else SPEED_M
    searched = {"count": 0, "seconds": 0.0}
    search = cslt_algorithms._search

    def timed_search(*a):  # how long the algorithm search takes, for the budget
        t = time.perf_counter()
        try:
            return search(*a)
        finally:
            torch.cuda.synchronize()
            searched["count"] += 1
            searched["seconds"] += time.perf_counter() - t

    cslt_algorithms._search = timed_search
    backends.set_algorithm_search(True)
    rows, t0 = [], time.perf_counter()
    for n, k in shapes:
        impls, refs = _impls(n, k)
        x = torch.randn(128, k, device="cuda", dtype=torch.bfloat16)
        checks: dict = {}
        for name, ref in refs.items():
            if ref is not None:
                try:
                    want, got = impls[ref](x).float(), impls[name](x).float()
                    checks[name] = "exact" if torch.equal(want, got) else round(sqnr_db(want, got), 1)
                except Exception as e:  # a kernel this GPU / torch lacks is a result, not a crash
                    checks[name] = f"error: {_err(e)[:160]}"
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row: dict = {"N": n, "K": k, "M": m, "sqnr_db_vs_reference": checks}
            for name in refs:
                if name.endswith(VARIANTS) and time.perf_counter() - t0 > 0.6 * args.budget:
                    continue  # the optional layout columns give way to the budget
                try:
                    t, graphed = _timeit(lambda f=impls[name], x=x: f(x), True)
                    row[f"{name}_us"], row[f"{name}_graphed"] = round(t, 2), graphed
                    if m >= EAGER_ALSO_MIN_M and name in EAGER_COLUMNS:
                        row[f"{name}_eager_us"] = round(_timeit(lambda f=impls[name], x=x: f(x), False)[0], 2)
                except Exception as e:  # a missing kernel is a result, not a crash
                    row[f"{name}_us"] = None
                    row[f"{name}_error"] = _err(e)[:200]
            for fmt in FORMATS:
                for col in _columns(fmt)[1:-1]:
                    if row.get(f"dense_{fmt}_us") and row.get(f"{col}_us"):
                        row[f"{col}_speedup"] = round(row[f"dense_{fmt}_us"] / row[f"{col}_us"], 3)
                if row.get(f"dense_{fmt}_eager_us") and row.get(f"sparse_{fmt}_eager_us"):
                    row[f"sparse_{fmt}_eager_speedup"] = round(
                        row[f"dense_{fmt}_eager_us"] / row[f"sparse_{fmt}_eager_us"], 3)
                row[f"sparse_{fmt}_alg"] = _algo(n, k, m, fmt, None)
                for v in VARIANTS:
                    row[f"sparse_{fmt}_{v}_alg"] = _algo(n, k, m, fmt, v)
            rows.append(row)
            print(
                f"N={n} K={k} M={m}: "
                + ", ".join(f"{c}={_fmt(row.get(c))}" for c in TABLE)
                + f", algs bf16={row['sparse_bf16_alg']} int8dq={row['sparse_int8dq_alg']}",
                flush=True,
            )
        del impls
        torch.cuda.empty_cache()
    cslt_algorithms._search = search
    cross = crossovers(rows, ms)
    print_table(rows)
    result = {
        "benchmark": "sparsity_speed",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cusparselt": torch.backends.cusparselt.version(),
        "git_sha": git_sha(),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "cusparselt_search": {"searches": searched["count"], "seconds": round(searched["seconds"], 1)},
        "auto_crossovers": {c: v[c] for v in cross.values() for c in v if c.endswith("MIN_TOKENS")},
        "crossovers": cross,
        # the dense int8dq column runs lowbit's Int8Tensor AUTO: the Triton W8A8 path from this many
        # tokens on (torch._int_mm below); speed.py trusts int8dq rows there only with this key
        "dense_int8dq_triton_min_tokens": TRITON_MIN_TOKENS,
        "rows": rows,
    }
    if args.table:
        args.table.write_text(json.dumps(speed.table_from_results(result), indent=1) + "\n")
        print(f"wrote {args.table}")
    return result
