"""The FP8 GEMM ceiling at prefill and large-batch decode shapes: bf16 cuBLAS against ``torch._scaled_mm`` with
the project's scaling (per-token activations x per-channel weights, row-wise) and, for reference only, one
per-tensor scale (cuBLASLt's fastest FP8 mode; not what ``quantization="fp8"`` computes). TFLOP/s from the
median of CUDA-event-timed runs.

Usage: python benchmarks/bench_fp8_gemm.py [--model llama-3.1-8b] [--rows 1024,8192]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_triton_attention import time_cuda  # noqa: E402

SHAPES = {  # (name, N, K) of one decoder layer, gate and up fused
    "llama-3.1-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "llama-3.2-1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)],
}


def timed(fn, reps: int = 30) -> float:
    """Median seconds of ``fn`` (CUDA events, after warm-up)."""
    return time_cuda(fn, reps, 5) / 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--rows", default="1024,8192")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from autodeploy.ops.quant import quantize_fp8_activation, scaled_mm_prequantized

    f8 = torch.float8_e4m3fn
    rows = []
    print(f"{'shape':>8} {'M':>6} {'bf16':>8} {'fp8 row':>8} {'fp8 tensor':>10}  (TFLOP/s)")
    for m in (int(v) for v in args.rows.split(",")):
        for name, n, k in SHAPES[args.model]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            wq = w.to(f8)
            ws = torch.rand(n, 1, device="cuda") + 0.5
            xq, xs = quantize_fp8_activation(x, None)
            one = torch.ones((), device="cuda")
            flop = 2.0 * m * n * k
            t_bf16 = timed(lambda: x @ w.t())
            t_row = timed(lambda: scaled_mm_prequantized(xq, xs, wq, ws, None, torch.bfloat16))
            t_tensor = timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            r = {"shape": name, "M": m, "N": n, "K": k, "bf16_tflops": flop / t_bf16 / 1e12,
                 "fp8_rowwise_tflops": flop / t_row / 1e12, "fp8_tensor_tflops": flop / t_tensor / 1e12}
            rows.append(r)
            print(f"{name:>8} {m:6d} {r['bf16_tflops']:8.0f} {r['fp8_rowwise_tflops']:8.0f} "
                  f"{r['fp8_tensor_tflops']:10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
