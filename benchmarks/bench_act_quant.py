"""The FP8 producer kernels at prefill sizes: the gated activation + per-token quantizer (``gated_act_fp8``)
and RMSNorm (+ residual add) + quantizer (``rms_norm_fp8``), timed at a step's token count and reported as
achieved bandwidth; ``--warps`` times the activation kernel's launch at other warp counts too.

Usage: python benchmarks/bench_act_quant.py [--tokens 1,1024,8192] [--hidden 4096] [--inter 14336] [--warps 4,8,16,32]
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_triton_attention import time_cuda  # noqa: E402


def timed(fn, reps: int = 30) -> float:
    """Median seconds of ``fn`` (CUDA events, after warm-up)."""
    return time_cuda(fn, reps, 5) / 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,1024,8192", help="rows of each call (comma list)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--warps", default="4,8,16,32")
    args = p.parse_args()
    for t in (int(v) for v in args.tokens.split(",")):
        act_sweep(t, args.inter, [int(w) for w in args.warps.split(",")])
        norm_sweep(t, args.hidden, [int(w) for w in args.warps.split(",")])


def act_sweep(t: int, n: int, warps_list: list) -> None:
    import triton

    from autodeploy.backends.triton.kernels import gated_act as ga

    gate_up = torch.randn(t, 2 * n, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up[:, :n], gate_up[:, n:]
    act_bytes = t * n * (2 * 2 + 1) + t * 4
    sec = timed(lambda: ga.gated_act_fp8(gate, up, "silu"))
    print(f"gated_act_fp8 {t} x {n}: {sec * 1e6:7.1f} us, {act_bytes / sec / 1e12:.2f} TB/s (shipped launch)")
    q = torch.empty(t, n, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.empty(t, dtype=torch.float32, device="cuda")
    block = min(ga._FP8_ROW_BLOCK, triton.next_power_of_2(n))
    for warps in warps_list:
        def launch():
            ga._gated_act_fp8_kernel[(t,)](gate, up, q, s, gate.stride(0), up.stride(0), n, n,
                                           ACT=ga.ACTIVATIONS["silu"], BLOCK=block, EMULATE_RNE=False,
                                           EMULATE_E4M3=False, PDL=False, num_warps=warps)
        sec = timed(launch)
        print(f"  {warps:2d} warps, BLOCK {block}: {sec * 1e6:7.1f} us, {act_bytes / sec / 1e12:.2f} TB/s")


def norm_sweep(t: int, h: int, warps_list: list) -> None:
    from autodeploy.backends.triton.kernels import rms_norm as rn

    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(h, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(t, h, dtype=torch.float8_e4m3fn, device="cuda")
    s = torch.empty(t, dtype=torch.float32, device="cuda")
    new_res = torch.empty_like(x)
    typed = torch.empty((1, 1), dtype=x.dtype, device="cuda").expand(t, h)
    for label, r, nbytes in (("", None, t * h * 3 + t * 4), (" + residual", res, t * h * 7 + t * 4)):
        sec = timed(lambda: rn.rms_norm_fp8(x, w, 1e-5, residual=r))
        print(f"rms_norm_fp8{label} {t} x {h}: {sec * 1e6:7.1f} us, {nbytes / sec / 1e12:.2f} TB/s (shipped)")
        for warps in warps_list:
            sec = timed(lambda: rn._launch(x, r, w, typed, new_res if r is not None else None, 1e-5, None, q, s,
                                           num_warps=warps))
            print(f"  {warps:2d} warps: {sec * 1e6:7.1f} us, {nbytes / sec / 1e12:.2f} TB/s")
    out = torch.empty_like(x)
    for warps in warps_list:  # the unquantized add + norm (bf16 models), for comparison
        sec = timed(lambda: rn._launch(x, res, w, out, new_res, 1e-5, None, num_warps=warps))
        print(f"  rms_norm + residual, bf16 out, {warps:2d} warps: {sec * 1e6:7.1f} us, "
              f"{t * h * 8 / sec / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
