"""W4A8 kernels: int8 dynamic per-token activations x packed int4 weights.

reference.py  pure-torch references (same signatures as the launchers)
act_quant.py  single-pass per-token int8 quantization (Triton)
decode.py     weight-read-bound GEMM for small token counts (Triton, tensor cores at M<=16 tiles)
expand.py     int4 -> int8 / bf16 one-layer weight workspaces (+ act_quant in the same launch)
prefill.py    int8 tensor-core GEMM (Triton; TMA operand loads on Hopper)
op.py         torch.library custom ops + the token-count routing used by Int4Tensor
"""
