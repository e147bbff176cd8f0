"""Native CUTLASS kernels (Hopper sm_90a), compiled on first use and cached per machine.

build.py   header discovery, cache key and directory, the lazy JIT build, status for `lowbit doctor`
w4a8.py    the W4A8 GEMM op (int8 activations x packed int4 weights) used by Int4Tensor

Importing this package compiles nothing and touches no GPU.
"""
