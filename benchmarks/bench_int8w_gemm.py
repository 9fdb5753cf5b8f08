"""int8 GEMMs with more rows than the skinny GEMMs take (decode batches, chunked prefill), on a model's real
per-layer shapes, for several row counts: weight-only, the tiled Triton GEMM (``kernels/int8_gemm.py``) against
dequantize + cuBLAS (the canonical op's CUDA path) and bf16 cuBLAS on bf16 weights; W8A8, the row quantizer plus
the tiled GEMM against the canonical op's CUDA path (cuBLASLt int32 sums, then torch scaling). It finds the row
count where the tiled GEMMs stop beating the canonical paths (``INT8W_GEMM_MAX_M``).

Each case is a CUDA graph replaying the GEMM of one shape over every layer's own weight (each weight comes from
HBM, as in a step), timed with events. Two floors per case: bytes (weights plus activations in and out, over the
measured copy bandwidth) and FLOPs (over ``--peak-tflops``). Every variant is checked against the reference first.
Usage: TRITON_INTERPRET=0 python benchmarks/bench_int8w_gemm.py [--model llama-3.1-8b] [--rows 17,32,64,...]
[--configs "64/64/128/4/4;128/128/64/8/3"] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_gemv import graph_of, shapes  # noqa: E402
from bench_triton_attention import copy_bandwidth, time_cuda  # noqa: E402


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-30))


def variants(configs: list[tuple[int, ...]]) -> dict:
    """name -> fn(x, int8 weight, scale, bf16 weight)."""
    from torch.nn.functional import linear

    from autodeploy.backends.triton.kernels.int8_gemm import int8_w8a8_gemm, int8_weight_gemm
    from autodeploy.backends.triton.kernels.quant_gemm import quantize_int8_rows
    from autodeploy.ops.quant import _dequant_gemm, int8_linear_reference

    out = {"bf16 cuBLAS": lambda x, q, s, w: linear(x, w),
           "int8 dequant+cuBLAS": lambda x, q, s, w: _dequant_gemm(x, q, s),
           "int8 tiled": lambda x, q, s, w: int8_weight_gemm(x, q, s),
           "w8a8 canonical": lambda x, q, s, w: int8_linear_reference(x, q, s),
           "w8a8 tiled": lambda x, q, s, w: int8_w8a8_gemm(*quantize_int8_rows(x), q, s, out_dtype=x.dtype)}
    for cfg in configs:
        out["int8 tiled " + "/".join(map(str, cfg))] = lambda x, q, s, w, c=cfg: int8_weight_gemm(x, q, s, config=c)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--rows", default="17,32,64,128,256,512,1024,2048")
    p.add_argument("--layers", type=int, default=0, help="weights per shape (0: the model's layer count)")
    p.add_argument("--configs", default="", help="extra tiled configs: BLOCK_M/BLOCK_N/BLOCK_K/warps/stages;...")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense GEMM rate measured on this GPU")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    from autodeploy.ops import quant

    torch.manual_seed(0)
    bw = copy_bandwidth(1 << 30, 10) * 1e9
    configs = [tuple(int(v) for v in c.split("/")) for c in args.configs.split(";") if c]
    fns = variants(configs)
    rows = [int(r) for r in args.rows.split(",")]
    results = {"copy_GBps": bw / 1e9, "peak_tflops": args.peak_tflops, "cases": []}
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; FLOP floor at {args.peak_tflops:.0f} TFLOP/s")
    print(f"{'shape':8} {'rows':>5} " + " ".join(f"{n:>22}" for n in fns) + "   floor(bytes/int8)  floor(FLOPs)")
    for name, (n, k, count) in shapes(args.model).items():
        if name == "lm_head":
            continue  # left unquantized by the passes
        layers = args.layers or count
        weights = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(layers)]
        packs = []
        for w in weights:
            q, s = quant.quantize_int8_weight(w)
            packs.append((q, s, w.to(torch.bfloat16)))
        del weights
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = quant.int8_weight_linear_reference(x, *packs[0][:2])
            w8a8_want = quant.int8_linear_reference(x, *packs[0][:2])
            row = {"shape": name, "n": n, "k": k, "rows": m, "layers": layers, "us": {}}
            for vname, fn in fns.items():
                got = fn(x, *packs[0])
                ref = (x.float() @ packs[0][2].float().t() if vname.startswith("bf16")
                       else w8a8_want if vname.startswith("w8a8") else want)
                err = _rel_rms(got, ref)
                if err > 2e-2:
                    raise SystemExit(f"{vname} on {name} x {m} rows: relative RMS {err:.2e} from the reference")
                replay = graph_of([lambda pk=pk, fn=fn: fn(x, *pk) for pk in packs])
                row["us"][vname] = time_cuda(replay, args.reps, warmup=3) * 1e3 / layers
            byte_floor = (n * k + 2 * m * (k + n)) / bw * 1e6
            flop_floor = 2 * m * n * k / (args.peak_tflops * 1e12) * 1e6
            row.update(floor_bytes_us=byte_floor, floor_flops_us=flop_floor)
            results["cases"].append(row)
            print(f"{name:8} {m:5d} " + " ".join(f"{row['us'][v]:20.1f}us" for v in fns)
                  + f"   {byte_floor:10.1f}us  {flop_floor:10.1f}us")
        del packs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
