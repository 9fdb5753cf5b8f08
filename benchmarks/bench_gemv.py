"""Batch-1 decode GEMMs: cuBLAS (F.linear) vs the Triton skinny GEMM, on the real per-layer shapes.

Each case is a CUDA graph replaying the GEMM of one shape over every layer's own weight (so each weight comes
from HBM, as in a decode step), timed with events; the floor is the weight bytes over the measured copy
bandwidth. Usage: python benchmarks/bench_gemv.py [--models llama-3.2-1b llama-3.1-8b] [--m 1]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_triton_attention import copy_bandwidth, time_cuda  # noqa: E402

CONFIGS = [None, (8, 512, 4, 3), (16, 512, 4, 3), (16, 1024, 8, 3), (8, 256, 4, 3), (4, 1024, 4, 2),
           (8, 1024, 4, 2), (8, 2048, 8, 2)]


def shapes(name: str) -> dict[str, tuple[int, int, int]]:
    """name -> (N, K, count per step) of the fused-GEMM graph."""
    from autodeploy.models.builtin import BUILTIN_CONFIGS

    c = BUILTIN_CONFIGS[name]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = c.get("head_dim", h // c["num_attention_heads"])
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    return {"qkv": (qkv, h, layers), "o": (h, c["num_attention_heads"] * d, layers), "gate_up": (2 * i, h, layers),
            "down": (h, i, layers), "lm_head": (c["vocab_size"], h, 1)}


def graph_of(fns):
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g.replay


def main() -> int:
    from autodeploy.backends.triton.kernels.gemv import gemv

    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    p.add_argument("--m", type=int, nargs="+", default=[1])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    bw = copy_bandwidth(1 << 30, reps=10) * 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    dt = torch.bfloat16
    for model in args.models:
        total = {"cublas": 0.0, "gemv": 0.0, "floor": 0.0}
        for name, (n, k, count) in shapes(model).items():
            ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(count)]
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=dt)
                ref = torch.nn.functional.linear(x, ws[0])
                err = (gemv(x, ws[0]).float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                floor = count * n * k * 2 / bw * 1e6
                cub = time_cuda(graph_of([lambda w=w: torch.nn.functional.linear(x, w) for w in ws]), 20, 3) * 1e3
                best = None
                for cfg in CONFIGS:
                    try:
                        us = time_cuda(graph_of([lambda w=w: gemv(x, w, config=cfg) for w in ws]), 20, 3) * 1e3
                    except Exception as exc:  # a config that does not compile is skipped
                        print(f"  skip {cfg}: {type(exc).__name__}")
                        continue
                    rows.append(dict(model=model, gemm=name, m=m, config=cfg, us=us))
                    if best is None or us < best[0]:
                        best = (us, cfg)
                rows.append(dict(model=model, gemm=name, m=m, n=n, k=k, count=count, cublas_us=cub, gemv_us=best[0],
                                 gemv_cfg=best[1], floor_us=floor, rel_err=err))
                print(f"{model:13s} {name:8s} M={m} N={n:6d} K={k:5d} x{count:2d}: floor {floor:7.1f} us | cublas "
                      f"{cub:7.1f} us ({100 * floor / cub:4.1f}%) | gemv {best[0]:7.1f} us ({100 * floor / best[0]:4.1f}%)"
                      f" cfg={best[1]} | rel err {err:.1e}", flush=True)
                if m == args.m[0]:
                    total["cublas"] += cub
                    total["gemv"] += best[0]
                    total["floor"] += floor
            del ws
            torch.cuda.empty_cache()
        print(f"{model}: all GEMMs of a step at M={args.m[0]}: floor {total['floor']:.0f} us, cublas "
              f"{total['cublas']:.0f} us, best gemv {total['gemv']:.0f} us", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_gb_s=bw / 1e9, rows=rows), f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
