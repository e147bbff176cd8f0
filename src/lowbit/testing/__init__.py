"""Helpers shared by lowbit's tests and benchmarks: SQNR floors and real model shapes."""

from lowbit.testing.shapes import BENCH_M, MODEL_SHAPES, all_shapes
from lowbit.testing.sqnr import MIN_SQNR_DB, config_for, measure_floors, sqnr_db

__all__ = ["BENCH_M", "MIN_SQNR_DB", "MODEL_SHAPES", "all_shapes", "config_for", "measure_floors", "sqnr_db"]
