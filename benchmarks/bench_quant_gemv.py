"""Batch-1 decode GEMMs on quantized weights: the bf16 skinny GEMM against the FP8 / int8 skinny GEMMs
(``kernels/quant_gemm.py``) in their launch forms, on a model's real per-layer shapes. ``fp8 <launch>`` takes
float8 rows as a quantizing producer kernel hands them over; ``fp8 rows+<launch>`` quantizes them first with
``quantize_fp8_rows`` (what an FP8 linear after attention does).

Each case is a CUDA graph replaying the GEMM of one shape over every layer's own weight (each weight comes from
HBM, as in a decode step), timed with events; the floor is the weight bytes over the measured copy bandwidth.
Every variant is checked against the canonical op's reference first. ``--rows`` also times the activation
quantizer on prefill-sized inputs (the fused ``quantize_fp8_rows`` against the reference's chain of kernels).
Usage: python benchmarks/bench_quant_gemv.py [--model llama-3.1-8b] [--m 1] [--kinds bf16,fp8,int8w]
[--configs "words/4/2048/4/3;tc/32/512/4/4"] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_gemv import graph_of, shapes  # noqa: E402
from bench_triton_attention import copy_bandwidth, time_cuda  # noqa: E402

# (form, BLOCK_N, BLOCK_K, num_warps, num_stages), as quant_gemv_config returns them
CONFIGS = [("cc", 8, 2048, 4, 3), ("words", 4, 2048, 4, 3), ("words", 8, 2048, 4, 3), ("tc", 32, 256, 4, 6),
           ("tc", 64, 256, 4, 4), ("tc", 32, 512, 4, 4), ("tc", 64, 512, 4, 3), ("tc", 64, 512, 4, 4),
           ("tc", 64, 512, 4, 5),
           ("tc", 128, 256, 4, 4), ("tc", 128, 512, 8, 3), ("tc", 256, 256, 8, 3), ("tc", 256, 256, 8, 4)]


def main() -> int:
    from autodeploy.backends.triton.kernels.gemv import gemv
    from autodeploy.backends.triton.kernels.quant_gemm import quant_gemv, quantize_fp8_rows
    from autodeploy.ops import quant

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--layers", type=int, default=0, help="weights per shape (default: the model's layer count)")
    p.add_argument("--rows", default="", help="also time activation quantization for these row counts (4096,..)")
    p.add_argument("--json", default=None)
    p.add_argument("--best-out", default=None, help="write the fastest launch per kind (fp8, int8w) over all shapes")
    p.add_argument("--kinds", default="bf16,fp8,int8w", help="which of bf16, fp8, int8w to time")
    p.add_argument("--configs", default="", help="launches to try instead of CONFIGS: 'words/8/2048/4/3;tc/32/512/4/4'")
    args = p.parse_args()
    want = set(args.kinds.split(","))
    configs = [(c.split("/")[0], *map(int, c.split("/")[1:])) for c in args.configs.split(";") if c] or CONFIGS
    bw = copy_bandwidth(1 << 30, 10) * 1e9  # bytes/s
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    torch.manual_seed(0)
    rows = []
    dt = torch.bfloat16
    for name, (n, k, layers) in shapes(args.model).items():
        if name == "lm_head":
            continue
        layers = args.layers or layers
        w16 = [torch.randn(n, k, device="cuda", dtype=dt) / k**0.5 for _ in range(layers)]
        fp8 = [quant.quantize_fp8_weight(w, search=1) for w in w16]
        i8 = [quant.quantize_int8_weight(w) for w in w16]
        x = torch.randn(args.m, k, device="cuda", dtype=dt)
        cases = {"bf16 gemv": (lambda w: gemv(x, w), w16, 2)} if "bf16" in want else {}

        def old_fp8(wq, ws):  # the previous decode path: the reference quantizer, then the GEMV
            xq, xs = quant.quantize_fp8_activation(x)
            return quant_gemv(xq, wq, ws, xs, out_dtype=x.dtype)

        if "fp8" in want:
            cases["fp8 unfused act-quant"] = (lambda wt: old_fp8(*wt), fp8, 1)
        xq, xs = quantize_fp8_rows(x)  # the activation as a quantizing producer kernel hands it over

        def rows_then_gemv(wt, c):  # the one-launch quantizer, then the GEMV on float8 rows
            q, s = quantize_fp8_rows(x)
            return quant_gemv(q, wt[0], wt[1], s, out_dtype=x.dtype, config=c)

        for cfg in configs:
            if cfg[0] == "tc" and k % cfg[2]:
                continue
            tag = "/".join(map(str, cfg))
            if "fp8" in want:
                cases[f"fp8 {tag}"] = (lambda wt, c=cfg: quant_gemv(xq, wt[0], wt[1], xs, out_dtype=x.dtype,
                                                                   config=c), fp8, 1)
                cases[f"fp8 rows+{tag}"] = (lambda wt, c=cfg: rows_then_gemv(wt, c), fp8, 1)
            if "int8w" in want:
                cases[f"int8w {tag}"] = (lambda wt, c=cfg: quant_gemv(x, wt[0], wt[1], config=c), i8, 1)
        ref8 = quant.fp8_linear_reference(x, *fp8[0]).float()
        refi = quant.int8_weight_linear_reference(x, *i8[0]).float()
        for label, (fn, ws, nbytes) in cases.items():
            try:
                got = fn(ws[0]).float()
            except Exception as exc:  # a config Triton cannot compile for this shape
                print(f"{name:8s} {label:28s} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            ref = ref8 if label.startswith("fp8") else refi if label.startswith("int8") else got
            err = ((got - ref).norm() / ref.norm()).item()
            g = graph_of([lambda w=w: fn(w) for w in ws])
            us = time_cuda(g, args.reps, 3) * 1e3 / layers
            floor = n * k * nbytes / bw * 1e6
            rows.append(dict(shape=name, n=n, k=k, m=args.m, variant=label, us=us, floor_us=floor, rel_err=err))
            print(f"{name:8s} {label:28s} {us:7.1f} us  floor {floor:6.1f} ({100 * floor / us:5.1f}%)  "
                  f"rel err {err:.1e}", flush=True)
        del w16, fp8, i8
        torch.cuda.empty_cache()
    for r in [int(v) for v in args.rows.split(",") if v]:
        k = shapes(args.model)["qkv"][1]
        x = torch.randn(r, k, device="cuda", dtype=dt)
        q1, s1 = quantize_fp8_rows(x)
        q2, s2 = quant.quantize_fp8_activation(x)
        same = torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
        for label, fn in (("reference chain", lambda: quant.quantize_fp8_activation(x)),
                          ("quantize_fp8_rows", lambda: quantize_fp8_rows(x))):
            us = time_cuda(graph_of([fn]), args.reps, 3) * 1e3
            rows.append(dict(shape="act-quant", m=r, k=k, variant=label, us=us, bit_exact=same))
            print(f"act-quant rows {r:6d} {label:20s} {us:7.1f} us  bit-exact {same}", flush=True)
    kinds = {"fp8": lambda v: v.startswith("fp8 ") and "rows+" not in v and "unfused" not in v,
             "fp8 rows+": lambda v: v.startswith("fp8 rows+"), "int8w": lambda v: v.startswith("int8w ")}
    for name in dict.fromkeys(r["shape"] for r in rows if r["shape"] != "act-quant"):
        for kind, of_kind in kinds.items():
            cand = [r for r in rows if r["shape"] == name and of_kind(r["variant"])]
            if cand:
                best = min(cand, key=lambda r: r["us"])
                print(f"best {name:8s} {kind:9s}: {best['variant']} {best['us']:.1f} us "
                      f"({100 * best['floor_us'] / best['us']:.1f}% of floor)", flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    if args.best_out:  # per kind, the launch with the least summed time over the shapes (count-weighted)
        counts = {name: c for name, (_, _, c) in shapes(args.model).items()}
        lines = []
        for kind in [k for k in ("fp8", "int8w") if k in want]:
            tot: dict[str, float] = {}
            for r in rows:
                if kinds[kind](r["variant"]):
                    tot[r["variant"]] = tot.get(r["variant"], 0.0) + r["us"] * counts[r["shape"]]
            full = {v: t for v, t in tot.items() if sum(r["variant"] == v for r in rows) == len(counts) - 1}
            best = min(full, key=full.get)
            lines.append(f"{kind} {best.split(' ', 1)[1]}")
            print(f"best {kind}: {best} ({full[best]:.0f} us per step)", flush=True)
        open(args.best_out, "w").write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
