"""End-to-end LLM benchmark: lowbit formats vs bf16 and torch/torchao int4, at real Llama shapes.

Usage (one H100; stops starting runs after --budget-s, 400 s by default):
    python benchmarks/bench_llm.py
    # or one model per invocation, both into one table:
    python benchmarks/bench_llm.py --models llama-2-7b
    python benchmarks/bench_llm.py --models llama-3-8b --append
    # smoke test of every format and the compiled path first (tiny model, about a minute):
    python benchmarks/bench_llm.py --models tiny --out /tmp/llm_smoke.json

Random weights at real shapes (no downloads), one process, each model freed before the next
is built. Run kinds:
  decode-b1   batch 1, --prompt-len prompt, --max-new-tokens new tokens, decode step compiled
              (mode="reduce-overhead": CUDA graphs)
  ttft        batch 1, --ttft-prompt-len (8192) prompt, one new token: time to first token
  decode-b16  batch --batch-large (16), otherwise like decode-b1
Order (most important first): stage 1 = decode-b1 + ttft of bf16, W4A8 and torch-int4 on every
model; stage 2 = decode-b16 of --b16-formats (bf16, W4A8) on every model; stage 3 = the other
formats. Once --budget-s is spent the remaining runs are listed as skipped. Compile time is
the budget's main cost (tens of seconds per compiled run for a 32-layer model). JSON rows
(fields: lowbit.llm.harness) and a markdown table are rewritten after every run, so a run cut
short keeps its results.
Baselines: torch-int4 = torch.ops.aten._weight_int4pack_mm (tinygemm) on lowbit's int4wo
weights; torchao-int4 = torchao Int4WeightOnlyConfig(group_size=128), skipped with a note
when torchao does not import.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from lowbit.bench import git_sha
from lowbit.llm.harness import LoadOptions, RunOptions, format_row, load, run
from lowbit.llm.loading import make_quantizer

ACCEPTANCE_FORMATS = ("none", "w4a8", "torch-int4")
OTHER_FORMATS = ("int4wo", "int8wo", "int8dq", "fp8dq", "torchao-int4")
RESULTS = Path(__file__).resolve().parent / "results"
# Published reference (TorchAO 0.8 W4A8, Llama-2-7B, A100): model 3.31 GB, peak 4.52 GB.
TORCHAO_W4A8_LLAMA2_7B = {"model_size_gb": 3.31, "peak_memory_gb": 4.52}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama-2-7b,llama-3-8b")
    p.add_argument(
        "--formats",
        default=",".join(ACCEPTANCE_FORMATS + OTHER_FORMATS),
        help="comma list from: " + ", ".join(ACCEPTANCE_FORMATS + OTHER_FORMATS),
    )
    p.add_argument("--b16-formats", default="none,w4a8", help="formats that also run batch 16")
    p.add_argument(
        "--ttft-formats",
        default="none,w4a8,torch-int4,int4wo,int8dq,fp8dq",
        help="formats that also run the long-prompt TTFT",
    )
    p.add_argument(
        "--kinds",
        default="decode-b1,ttft,decode-b16",
        help="run kinds to keep (a subset of decode-b1, ttft, decode-b16), e.g. to split a study over runs",
    )
    p.add_argument("--batch-large", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the decode runs")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--ttft-prompt-len", type=int, default=8192)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size; 0 = per row")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-compile", action="store_true", help="eager decode (compile is the default)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=400.0,
        help="stop starting new runs after this many seconds (the rest are listed as skipped)",
    )
    p.add_argument("--append", action="store_true", help="add to the rows already in --out")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default benchmarks/results/llm_<device>.json; .md written beside)",
    )
    return p.parse_args(argv)


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """[(model, format, [run kinds])] in priority order."""
    models, formats = _split(args.models), _split(args.formats)
    b16, ttft = set(_split(args.b16_formats)), set(_split(args.ttft_formats))
    known = set(ACCEPTANCE_FORMATS + OTHER_FORMATS)
    bad = [f for f in formats if f not in known]
    if bad:
        raise SystemExit(f"bench_llm: unknown format(s) {bad}; allowed: {sorted(known)}")

    def first_kinds(fmt: str) -> list[str]:
        return ["decode-b1"] + (["ttft"] if fmt in ttft else [])

    # Stage 1: batch-1 decode + TTFT of bf16, W4A8 and tinygemm on every model (the headline);
    # stage 2: batch-16 decode (a rebuild is cheaper than holding the model); stage 3: the rest.
    stage1 = [(m, f, first_kinds(f)) for m in models for f in formats if f in ACCEPTANCE_FORMATS]
    stage2 = [(m, f, ["decode-b16"]) for m in models for f in formats if f in b16]
    stage3 = [(m, f, first_kinds(f)) for m in models for f in formats if f not in ACCEPTANCE_FORMATS]
    keep = set(_split(args.kinds))
    bad = keep - {"decode-b1", "ttft", "decode-b16"}
    if bad:
        raise SystemExit(f"bench_llm: unknown run kind(s) {sorted(bad)}; allowed: decode-b1, ttft, decode-b16")
    runs = [(m, f, [k for k in kinds if k in keep]) for m, f, kinds in stage1 + stage2 + stage3]
    return [r for r in runs if r[2]]


def run_options(kind: str, args: argparse.Namespace) -> RunOptions:
    compile_ = not args.no_compile
    if kind == "ttft":
        return RunOptions(
            batch_size=1,
            prompt_len=args.ttft_prompt_len,
            max_new_tokens=1,
            compile=False,
            extra={"run": kind},
        )
    batch = args.batch_large if kind == "decode-b16" else 1
    return RunOptions(
        batch_size=batch,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        compile=compile_,
        extra={"run": kind},
    )



def _free() -> None:
    torch._dynamo.reset()  # drops compiled graphs and their CUDA-graph memory pools
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _pick(rows: list[dict], model: str, quant: str, kind: str) -> dict | None:
    for r in rows:
        if r["model"] == model and r["quant"] == quant and r.get("run") == kind:
            return r
    return None


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def summary(rows: list[dict]) -> list[str]:
    """The acceptance comparisons, per model."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):

        def get(q: str, k: str, field: str, model: str = model) -> float | None:
            r = _pick(rows, model, q, k)
            return None if r is None else r.get(field)

        w, bf, ti = (get(q, "decode-b1", "decode_tokens_per_s") for q in ("w4a8", "none", "torch-int4"))
        mode = "compiled" if any(r["compile"] for r in rows) else "eager"
        out.append(
            f"- **{model}** decode batch 1 ({mode}): W4A8 {_f(w, '.1f')} tok/s = "
            f"{_ratio(w, bf)} bf16 ({_f(bf, '.1f')}), {_ratio(w, ti)} torch-int4 tinygemm "
            f"({_f(ti, '.1f')})"
        )
        w16, bf16 = (get(q, "decode-b16", "decode_tokens_per_s") for q in ("w4a8", "none"))
        b16 = next(
            (r["batch_size"] for r in rows if r["model"] == model and r.get("run") == "decode-b16"), "large"
        )
        out.append(
            f"- **{model}** decode batch {b16}: W4A8 {_f(w16, '.1f')} tok/s = {_ratio(w16, bf16)} "
            f"bf16 ({_f(bf16, '.1f')})"
        )
        t = {q: get(q, "ttft", "ttft_s") for q in ("w4a8", "none", "torch-int4")}
        plen = next((r["prompt_len"] for r in rows if r["model"] == model and r.get("run") == "ttft"), "?")
        out.append(
            f"- **{model}** TTFT at {plen} tokens: W4A8 {_f(t['w4a8'], '.3f')} s, bf16 "
            f"{_f(t['none'], '.3f')} s, torch-int4 {_f(t['torch-int4'], '.3f')} s"
        )
        size, res = get("w4a8", "decode-b1", "model_size_gb"), get("w4a8", "decode-b1", "peak_reserved_gb")
        size_ne = get("w4a8", "decode-b1", "model_size_no_embedding_gb")
        bres = get("none", "decode-b1", "peak_reserved_gb")
        ref = TORCHAO_W4A8_LLAMA2_7B if model == "llama-2-7b" else None
        out.append(
            f"- **{model}** W4A8 model size {_f(size, '.2f')} GB ({_f(size_ne, '.2f')} GB without the "
            f"input embedding), peak reserved {_f(res, '.2f')} GB; bf16 peak reserved {_f(bres, '.2f')} GB"
            + (
                f" (TorchAO 0.8 W4A8 on A100: {ref['model_size_gb']} GB / {ref['peak_memory_gb']} GB)"
                if ref
                else ""
            )
        )
    return out


def markdown(meta: dict, rows: list[dict], skipped: list[str], notes: list[str]) -> str:
    head = (
        "| model | format | run | batch | prompt | new | TTFT ms | prefill tok/s | decode tok/s | GB/s "
        "| size GB (no emb) | peak alloc / reserved GB | compile s |"
    )
    lines = [
        f"# LLM benchmark ({meta['device_name']})",
        "",
        f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
        f"git {meta['git_sha']}, dtype {meta['dtype']}, random weights, {meta['started']}",
        "",
        "## Acceptance comparisons",
        "",
        *summary(rows),
        "",
        "## All runs",
        "",
        head,
        "|" + "---|" * 13,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['quant']} | {r.get('run', '')} | {r['batch_size']} | {r['prompt_len']} | "
            f"{r['max_new_tokens']} | {r['ttft_s'] * 1e3:.1f} | {r['prefill_tokens_per_s']:.0f} | "
            f"{_f(r['decode_tokens_per_s'], '.1f')} | {_f(r['bandwidth_gb_s'], '.0f')} | "
            f"{r['model_size_gb']:.2f} ({r['model_size_no_embedding_gb']:.2f}) | "
            f"{_f(r['peak_allocated_gb'], '.2f')} / {_f(r['peak_reserved_gb'], '.2f')} | "
            f"{_f(r['compile_time_s'], '.1f')} |"
        )
    if notes or skipped:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [f"- skipped: {s}" for s in skipped]
    lines += [
        "",
        "TTFT = prompt on device to first token (eager prefill). decode tok/s counts every "
        "sequence of the batch; GB/s = weight bytes read per step (no input embedding) x steps/s. "
        "Peak memory is measured from KV-cache allocation to the end of each run (model resident).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    builds = plan(args)
    from lowbit.llm.harness import resolve_device
    from lowbit.llm.metrics import device_name, versions

    device = resolve_device(args.device)
    slug = device_name(device).replace(" ", "_").replace("/", "_").split("(")[0].strip("_")
    out = args.out or RESULTS / f"llm_{slug}.json"
    meta = {
        "device_name": device_name(device),
        "device": str(device),
        "dtype": args.dtype,
        "versions": versions(),
        "git_sha": git_sha(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    rows: list[dict] = []
    skipped: list[str] = []
    notes: list[str] = []
    if args.append and out.is_file():  # e.g. one invocation per model, one table
        prev = json.loads(out.read_text())
        rows, skipped, notes = prev["rows"], prev.get("skipped", []), prev.get("notes", [])

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped, "notes": notes}, indent=1))
        out.with_suffix(".md").write_text(markdown(meta, rows, skipped, notes))

    t_start = time.perf_counter()
    for model, fmt, kinds in builds:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(f"{model} {fmt} {kinds} (time budget {args.budget_s:.0f} s spent)")
            save()
            continue
        try:
            quantizer = make_quantizer(
                fmt, group_size=args.group_size if fmt == "w4a8" else ((args.group_size or 128) if "int4" in fmt else None)
            )
        except ImportError as e:
            notes.append(f"{fmt} skipped on {model}: {e}")
            print(f"note: {fmt} skipped: {e}", flush=True)
            save()
            continue
        loaded = None
        try:
            loaded = load(
                LoadOptions(
                    model=model, random_weights=True, quant=fmt, device=args.device, dtype=args.dtype
                ),
                quantizer=quantizer,
            )
            print(f"built {model} {fmt} in {loaded.load_time_s:.1f} s", flush=True)
            for kind in kinds:
                if time.perf_counter() - t_start > args.budget_s:
                    skipped.append(f"{model} {fmt} {kind} (time budget)")
                    continue
                _free()  # each run's peak memory starts from the resident model only
                try:
                    row = run(loaded, run_options(kind, args))
                except Exception as e:  # one failed run (e.g. OOM) must not lose the others
                    notes.append(f"{model} {fmt} {kind} failed: {type(e).__name__}: {str(e)[:300]}")
                    print(f"FAILED {model} {fmt} {kind}: {type(e).__name__}: {e}", flush=True)
                    traceback.print_exc()
                    _free()
                    continue
                row.pop("generated_text", None)
                rows.append(row)
                print(f"[{time.perf_counter() - t_start:6.0f} s] {kind:10s} {format_row(row)}", flush=True)
                save()
        except Exception as e:
            notes.append(f"{model} {fmt} build failed: {type(e).__name__}: {str(e)[:300]}")
            print(f"FAILED building {model} {fmt}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        finally:
            loaded = None
            _free()
        save()
    save()
    print("\n".join(summary(rows)))
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
