"""One MoE experts layer, Mixtral-8x7B-shaped (H=4096, I=14336, E=8, K=2, bf16 on CUDA): HF's experts module
(``eager``: the per-expert loop, "unrolled"; ``grouped_mm``: transformers 5.x's default) against our torch
reference and the fused Triton kernel (backends/triton/kernels/moe.py).

Routing is Mixtral's (softmax over random router logits, top-2, renormalised). The floor is the bytes of the
experts the batch touches (3 matrices each) over the measured copy bandwidth. The fused kernel is also timed
replayed from a CUDA graph (no host sync inside, so a compiled step captures it). ``--sweep`` also times a few
kernel tile configurations and reports the best. Prints a table and writes JSON (``--json``).
``--quant int8-weight,fp8,int8`` adds the quantized experts (one byte per weight: half the floor).
Usage: TRITON_INTERPRET=0 python benchmarks/bench_moe.py [--batches 1,64,256] [--sweep] [--quant int8-weight,fp8,int8]
[--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_triton_attention import copy_bandwidth, time_cuda  # noqa: E402

# (block_m, block_n, block_k, num_warps, num_stages); block_m None: from the load (kernels/moe.block_m_for)
SWEEP = [(None, 64, 64, 4, 3), (None, 64, 128, 4, 3), (None, 128, 64, 4, 3), (None, 128, 64, 8, 3),
         (None, 64, 64, 4, 4), (None, 32, 128, 4, 4), (16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (64, 64, 64, 4, 3),
         (64, 128, 64, 8, 3), (None, 64, 256, 4, 2)]


def experts_module(impl: str, H: int, I: int, E: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    m = MixtralExperts(cfg)
    with torch.no_grad():
        m.gate_up_proj.normal_(0, 0.02)
        m.down_proj.normal_(0, 0.02)
    return m.to(device="cuda", dtype=torch.bfloat16).eval()


def graphed(fn):
    """``fn`` captured in a CUDA graph on first call (as a compiled model's step runs it), replayed after."""
    state: dict = {}

    def replay():
        if not state:
            fn()
            torch.cuda.synchronize()
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                state["out"] = fn()
        state["graph"].replay()
        return state["out"]

    return replay


def routing(T: int, H: int, E: int, K: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), K, -1)
    return x, ids, w / w.sum(-1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quant", default="", help="also time quantized experts: int8-weight,fp8,int8 (the reference and "
                                                "the fused kernels; errors are against HF's bf16 layer)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe needs a CUDA GPU")
    from autodeploy.backends.triton.kernels.moe import fused_moe
    from autodeploy.numerics import rel_rms
    from autodeploy.ops.moe import moe_reference_grouped

    H, I, E, K = a.hidden, a.inter, a.experts, a.topk
    bw = copy_bandwidth(1 << 30, 10)  # the HBM ceiling: a copy's read + write bytes per second, as bench_decode
    hf = {impl: experts_module(impl, H, I, E) for impl in ("eager", "grouped_mm")}
    m = hf["eager"]
    hf["grouped_mm"].load_state_dict(m.state_dict())
    w_gate, w_up, w_down = m.gate_up_proj[:, :I], m.gate_up_proj[:, I:], m.down_proj
    from autodeploy.ops.moe import moe_quant_reference
    from autodeploy.passes.quantize_linears import quantize_experts

    quantized = {}
    for mode in filter(None, a.quant.split(",")):
        parts = [quantize_experts(t.float(), mode) for t in (w_gate, w_up, w_down)]
        quantized[mode] = ([p["weight"] for p in parts], [p["scale"] for p in parts])
    rows = []
    for T in (int(b) for b in a.batches.split(",")):
        x, ids, w = routing(T, H, E, K, seed=T)
        active = int(torch.unique(ids).numel())
        floor_ms = active * 3 * H * I * 2 / (bw * 1e9) * 1e3
        with torch.no_grad():
            ref = hf["eager"](x, ids, w)
            fns = {
                "unrolled (HF eager loop)": lambda: hf["eager"](x, ids, w),
                "HF grouped_mm": lambda: hf["grouped_mm"](x, ids, w),
                "torch reference": lambda: moe_reference_grouped(x, ids, w, w_gate, w_up, w_down),
                "fused triton": lambda: fused_moe(x, ids, w, w_gate, w_up, w_down),
                "fused triton, CUDA graph": graphed(lambda: fused_moe(x, ids, w, w_gate, w_up, w_down)),
            }
            for mode, (q, sc) in quantized.items():
                fns[f"{mode} torch reference"] = lambda q=q, sc=sc, mode=mode: moe_quant_reference(
                    x, ids, w, *q, *sc, mode=mode)
                fns[f"{mode} fused triton, CUDA graph"] = graphed(
                    lambda q=q, sc=sc, mode=mode: fused_moe(x, ids, w, *q, scales=sc, mode=mode))
            errs, times = {}, {}
            for name, fn in fns.items():
                try:
                    errs[name] = rel_rms(fn().float(), ref.float())
                    times[name] = time_cuda(fn, a.reps, warmup=5)
                except Exception as exc:  # e.g. grouped_mm unavailable on this GPU / torch
                    print(f"  {name} at batch {T}: {type(exc).__name__}: {exc}")
                    errs[name], times[name] = float("nan"), float("nan")
            best_cfg = None
            if a.sweep:
                for cfg in SWEEP:
                    bm, bn, bk, nw, ns = cfg
                    fn = lambda: fused_moe(x, ids, w, w_gate, w_up, w_down, block_m=bm, block_n=bn,  # noqa: E731
                                           block_k=bk, num_warps=nw, num_stages=ns)
                    try:
                        ms = time_cuda(fn, a.reps, warmup=3)
                    except Exception as exc:  # a config this GPU cannot compile (shared memory)
                        print(f"  config {cfg}: {type(exc).__name__}")
                        continue
                    if best_cfg is None or ms < best_cfg[1]:
                        best_cfg = (cfg, ms)
        unrolled, fused = times["unrolled (HF eager loop)"], times["fused triton"]
        row = {"batch": T, "active_experts": active, "floor_ms": floor_ms, "floor_ms_8bit": floor_ms / 2,
               "ms": times, "rel_rms_vs_hf": errs,
               "fused_speedup_vs_unrolled": unrolled / fused,
               "fused_speedup_vs_grouped_mm": times["HF grouped_mm"] / fused,
               "fused_pct_of_floor": 100 * floor_ms / fused}
        if best_cfg is not None:
            row["sweep_best"] = {"config": list(best_cfg[0]), "ms": best_cfg[1],
                                 "speedup_vs_unrolled": unrolled / best_cfg[1]}
        rows.append(row)
    print(f"MoE experts layer H={H} I={I} E={E} K={K} bf16; copy bandwidth {bw:.0f} GB/s")
    names = list(rows[0]["ms"])
    print(f"{'batch':>5} {'floor':>7} " + " ".join(f"{n:>26}" for n in names) + f" {'fused/unrolled':>15}")
    for r in rows:
        cells = " ".join(f"{r['ms'][n]:>10.3f} ms (err {r['rel_rms_vs_hf'][n]:.0e})" for n in names)
        print(f"{r['batch']:>5} {r['floor_ms']:>5.3f}ms {cells} {r['fused_speedup_vs_unrolled']:>14.2f}x")
        if "sweep_best" in r:
            b = r["sweep_best"]
            print(f"      sweep best {b['config']}: {b['ms']:.3f} ms ({b['speedup_vs_unrolled']:.2f}x unrolled)")
    out = {"shape": {"H": H, "I": I, "E": E, "K": K, "dtype": "bfloat16"}, "copy_bandwidth_gbs": bw, "rows": rows}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
