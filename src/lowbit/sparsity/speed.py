"""Does 2:4 pay? The measured speed of lowbit's 2:4 kernels against the dense formats, by shape
and token count, from the committed GPU table.

    from lowbit.sparsity import crossover_tokens, pays_off, speedup_vs_dense
    speedup_vs_dense(11008, 4096, 8192, "int8dq")   # dense int8dq time / 2:4 int8dq time
    pays_off(11008, 4096, 1, "bf16")                 # False: at decode 2:4 bf16 is slower than dense
    crossover_tokens(4096, 11008, "int8dq")          # the M from which 2:4 beats dense (None: never)

The table (lowbit/data/sparsity_speed_h100.json) is written by
`python benchmarks/bench_sparsity.py --speed --table src/lowbit/data/sparsity_speed_h100.json`
from the same run as benchmarks/results/sparsity_speed_h100.json. "Dense" is the dense model's
format (cuBLAS bf16, or lowbit's dense int8dq as the run took it), not lowbit's dense path of a
2:4 weight. The packaged table predates the Triton W8A8 path that dense int8dq takes from 16
tokens on (it timed torch._int_mm), so from there its int8dq estimates are None with a note
until it is re-measured; bf16 and fewer tokens are unaffected. Between two measured token counts
the lower of the two speedups is taken (conservative); below/above the measured range, the
nearest measured one. A shape the table lacks gets the worst
measured shape at that token count (`SpeedEstimate.measured` says which).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

FORMATS = {"bf16": ("dense_bf16", "sparse_bf16"), "int8dq": ("dense_int8dq", "sparse_int8dq")}
TABLE_FILE = "sparsity_speed_h100.json"
# The columns the compact table keeps from a bench_sparsity.py --speed result row.
KEPT = (
    ("N", "K", "M")
    + tuple(f"{c}_us" for pair in FORMATS.values() for c in pair)
    + (
        "sparse_bf16_dense_path_us",
        "sparse_int8dq_dense_path_us",
        "sparse_bf16_alg",
        "sparse_int8dq_alg",
    )
)


@dataclass(frozen=True)
class SpeedEstimate:
    fmt: str
    n: int
    k: int
    tokens: int
    speedup: float | None  # dense time / 2:4 time; None: the table has no number for it
    measured: bool  # (N, K) is in the table (else: the worst measured shape)
    device: str
    note: str = ""  # why speedup is None, when the table has a reason

    def pays(self, min_speedup: float = 1.0) -> bool:
        return self.speedup is not None and self.speedup >= min_speedup


def table_from_results(result: dict[str, Any]) -> dict[str, Any]:
    """The compact table lowbit ships, from a `bench_sparsity.py --speed` result."""
    return {
        "source": "benchmarks/bench_sparsity.py --speed",
        **{k: result.get(k) for k in ("device", "torch", "cusparselt", "git_sha",
                                      "dense_int8dq_triton_min_tokens")},
        "cusparselt_algorithm": "searched" if any("sparse_bf16_alg" in r for r in result["rows"]) else "0",
        "rows": [{k: r[k] for k in KEPT if k in r} for r in result["rows"]],
    }


@functools.cache
def _packaged_table() -> dict[str, Any]:
    return json.loads(resources.files("lowbit").joinpath("data", TABLE_FILE).read_text())


def load_table(table: dict[str, Any] | None = None) -> dict[str, Any]:
    """`table` as given, else the packaged H100 table."""
    return _packaged_table() if table is None else table


def _check_fmt(fmt: str) -> tuple[str, str]:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}; allowed: {sorted(FORMATS)}")
    return FORMATS[fmt]


STALE_NOTE = ("dense int8dq runs the Triton W8A8 kernels from {m} tokens on; this table timed it with "
              "torch._int_mm, so it does not say (re-run benchmarks/sparsity_speed.py --table)")


def _stale_from(table: dict[str, Any], fmt: str) -> int | None:
    """The token count from which the table's dense int8dq times no longer describe lowbit's dense
    int8dq (None: they do). Tables written before the Triton W8A8 path lack the key that says so."""
    from lowbit.formats.int8 import TRITON_MIN_TOKENS

    if fmt != "int8dq" or table.get("dense_int8dq_triton_min_tokens") == TRITON_MIN_TOKENS:
        return None
    if not any(r.get("dense_int8dq_us") for r in table.get("rows", [])):
        return None  # no int8dq rows at all: nothing to be stale
    return TRITON_MIN_TOKENS


def _speedups(table: dict[str, Any], fmt: str) -> dict[tuple[int, int], dict[int, float]]:
    """{(N, K): {M: dense us / 2:4 us}} for the rows that have both times."""
    dense, sparse = _check_fmt(fmt)
    out: dict[tuple[int, int], dict[int, float]] = {}
    for r in table["rows"]:
        d, s = r.get(f"{dense}_us"), r.get(f"{sparse}_us")
        if d and s:
            out.setdefault((r["N"], r["K"]), {})[r["M"]] = d / s
    return out


def _at(by_m: dict[int, float], tokens: int) -> float:
    """The speedup at `tokens`: the lower of the two measured neighbours (the nearest outside)."""
    ms = sorted(by_m)
    below = [m for m in ms if m <= tokens]
    above = [m for m in ms if m >= tokens]
    lo = below[-1] if below else ms[0]
    hi = above[0] if above else ms[-1]
    return min(by_m[lo], by_m[hi])


def speedup_vs_dense(
    n: int, k: int, tokens: int, fmt: str = "int8dq", table: dict[str, Any] | None = None
) -> SpeedEstimate:
    """How much faster (> 1) or slower (< 1) the 2:4 format runs (N, K) at `tokens` than dense."""
    if tokens < 1:
        raise ValueError(f"tokens={tokens} must be >= 1")
    tab = load_table(table)
    by_shape = _speedups(tab, fmt)
    device = str(tab.get("device"))
    stale = _stale_from(tab, fmt)
    if stale is not None and tokens >= stale:
        return SpeedEstimate(fmt, n, k, tokens, None, False, device, STALE_NOTE.format(m=stale))
    if (n, k) in by_shape:
        return SpeedEstimate(fmt, n, k, tokens, _at(by_shape[(n, k)], tokens), True, device)
    worst = [_at(by_m, tokens) for by_m in by_shape.values()]
    return SpeedEstimate(fmt, n, k, tokens, min(worst) if worst else None, False, device)


def pays_off(
    n: int,
    k: int,
    tokens: int,
    fmt: str = "int8dq",
    min_speedup: float = 1.0,
    table: dict[str, Any] | None = None,
) -> bool:
    """Whether the measured table says 2:4 runs (N, K) at `tokens` at least `min_speedup`x dense."""
    return speedup_vs_dense(n, k, tokens, fmt, table).pays(min_speedup)


def crossover_tokens(n: int, k: int, fmt: str = "int8dq", table: dict[str, Any] | None = None) -> int | None:
    """The smallest measured token count from which 2:4 beats dense at every larger measured one
    (None: it never does in the measured range). Shapes the table lacks: the worst measured shape."""
    tab = load_table(table)
    by_shape = _speedups(tab, fmt)
    shapes = [by_shape[(n, k)]] if (n, k) in by_shape else list(by_shape.values())
    if not shapes:
        return None
    if _stale_from(tab, fmt) is not None:
        return None  # the larger token counts' int8dq times are stale (see speedup_vs_dense)
    ms = sorted(set.intersection(*(set(s) for s in shapes)))
    wins = [all(s[m] > 1.0 for s in shapes) for m in ms]
    first = None
    for m, win in zip(reversed(ms), reversed(wins)):
        if not win:
            break
        first = m
    return first
