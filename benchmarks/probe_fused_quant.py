"""Probe: how often the fused RMSNorm + int8 quantization differs from act_quant of the norm kernel's
bf16/fp16 output on a GPU, next to act_quant (Triton) and act_quant_traceable (float64 division)
against the pure-torch reference. Prints mismatched element counts (x = randn(4096, 4096) * 4).

    python benchmarks/probe_fused_quant.py   # results/fused_quant_mismatch_h100.txt
"""

from __future__ import annotations

import torch

from lowbit.kernels.fused import rms_norm, rms_norm_quant
from lowbit.kernels.w4a8.act_quant import act_quant, act_quant_traceable
from lowbit.kernels.w4a8.reference import act_quant_ref


def main() -> None:
    torch.manual_seed(0)
    for dt in (torch.float16, torch.bfloat16):
        x = (torch.randn(4096, 4096, device="cuda") * 4).to(dt)
        w = (torch.rand(4096, device="cuda") + 0.5).to(dt)
        y = rms_norm(x, w, 1e-5)
        qk, sk = rms_norm_quant(x, w, 1e-5)
        qa, sa = act_quant(y)
        qr, sr = act_quant_ref(y)
        qt, _ = act_quant_traceable(y)

        def n(a, b):
            return int((a != b).sum())

        print(dt, "act_quant vs ref", n(qa, qr), "| traceable(f64) vs ref", n(qt, qr),
              "| norm_quant vs act_quant(norm)", n(qk, qa), "scales", n(sk, sa))


if __name__ == "__main__":
    main()
