#!/usr/bin/env bash
# The multi-GPU checks and timings of lowbit.distributed, on one host with 2 GPUs:
#   bash benchmarks/run_multi_gpu.sh OUTDIR
# 1. FSDP2 step, float8 (tensorwise: also with float8 all-gather) vs bf16, compiled, 8192 and
#    2048 tokens per rank;  2. TP=2 vs TP=1 W4A8 greedy tokens (bench_distributed tp, eager);
# 3. `lowbit generate --tp 2` vs one GPU, W4A8 per-row and bf16, CUDA-graph decode: same greedy
#    tokens, decode tok/s. Writes JSON / JSONL into OUTDIR and prints a short table last.
set -uo pipefail
OUT=${1:?usage: run_multi_gpu.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# (MODEL=tiny DIM=256 LAYERS=2 TOKENS=256 SMALL_TOKENS=64: a CPU smoke run of the plumbing)
MODEL=${MODEL:-llama-2-7b} DIM=${DIM:-4096} LAYERS=${LAYERS:-8} TOKENS=${TOKENS:-8192} SMALL_TOKENS=${SMALL_TOKENS:-2048}
B="torchrun --nproc-per-node 2 benchmarks/bench_distributed.py"
keep() { grep '^{\|Error\|error' | tail -3; }
timeout 240 $B fsdp --dim "$DIM" --layers "$LAYERS" --compile --tokens "$TOKENS" --out "$OUT/fsdp.jsonl" 2>&1 | keep
if [ "$SMALL_TOKENS" -gt 0 ]; then  # (SMALL_TOKENS=0 skips it)
    timeout 240 $B fsdp --dim "$DIM" --layers "$LAYERS" --compile --tokens "$SMALL_TOKENS" --out "$OUT/fsdp.jsonl" 2>&1 | keep
fi
timeout 240 $B tp --model "$MODEL" --group-size 0 --new-tokens 64 --out "$OUT/tp.jsonl" 2>&1 | keep
G="generate --model $MODEL --random-weights --prompt-len 128 --max-new-tokens 128 --cuda-graph"
for q in "w4a8 --group-size 0" "none"; do
    name=${q%% *}
    timeout 240 torchrun --nproc-per-node 2 -m lowbit $G --quant $q --tp 2 --json-out "$OUT/gen_${name}_tp2.json" 2>&1 | grep "$MODEL\|rror" | tail -2
    timeout 240 python -m lowbit $G --quant $q --json-out "$OUT/gen_${name}_tp1.json" 2>&1 | grep "$MODEL\|rror" | tail -2
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | result |\n|---|---|")
for line in (out / "fsdp.jsonl").read_text().splitlines() if (out / "fsdp.jsonl").exists() else []:
    r = json.loads(line)
    f8g = r.get("speedup_float8_all_gather")
    print(f"| fsdp {r['recipe']} {r['tokens_per_rank']} tok/rank | bf16 {r['bf16_ms']:.1f} ms, float8 {r['speedup']:.2f}x"
          + (f", float8 all-gather {f8g:.2f}x |" if f8g else " |"))
for line in (out / "tp.jsonl").read_text().splitlines() if (out / "tp.jsonl").exists() else []:
    r = json.loads(line)
    print(f"| bench tp {r['kernel']} | tokens equal {r['tokens_equal']} ({r['equal_prefix']}/{r['new_tokens']}) |")
for name in ("w4a8", "none"):
    a, b = out / f"gen_{name}_tp1.json", out / f"gen_{name}_tp2.json"
    if a.exists() and b.exists():
        one, two = json.loads(a.read_text()), json.loads(b.read_text())
        same = one["generated_ids"] == two["generated_ids"]
        print(f"| generate {name} TP=2 vs 1 | tokens equal {same}; decode {two['decode_tokens_per_s']:.1f} vs "
              f"{one['decode_tokens_per_s']:.1f} tok/s ({two['decode_tokens_per_s'] / one['decode_tokens_per_s']:.2f}x);"
              f" graphs replayed {two['cuda_graph_replayed']}/{one['cuda_graph_replayed']} |")
PY
