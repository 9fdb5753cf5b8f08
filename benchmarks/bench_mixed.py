"""Prefill and mixed steps under several lowerings, side by side in one process: whole-step CUDA graphs per token
bucket (``cudagraph``), piecewise graphs around eager attention (``cudagraph-piecewise``) and decode-only graphs
(``cudagraph-decode``, where every step carrying prefill runs eager).

Part 1: one step of ``d`` decodes (context ``--ctx``) plus a ``p``-token prompt: median wall ms of a synchronised
step under each lowering, and the GPU's busy time in that step (profiler kernel sum). Part 2 (``--requests``):
an online workload, requests arriving as a Poisson process, through the real engine under each lowering:
throughput, TTFT and TPOT percentiles.

Usage: python benchmarks/bench_mixed.py --model llama-3.2-1b [--requests 400 --rate 40] [--lowerings a,b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import gpu_busy_ms, mixed_chunks  # noqa: E402

LOWERINGS = "cudagraph,cudagraph-piecewise,cudagraph-decode"


def step_ms(cm, batch, reps: int) -> float:
    """Median wall ms of one step, synchronised (the latency an engine step sees before it samples)."""
    for _ in range(2):
        cm.forward(batch)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cm.forward(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _pages_needed(cm, decodes: int, prefill: int, ctx: int) -> int:
    return -(-max(ctx + 1, prefill) // cm.page_size) * (decodes + 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--decodes", default="0,8,64,255")
    p.add_argument("--prefills", default="16,128,512,2000")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--num-pages", type=int, default=3072, help="KV pages per compiled model (same for all)")
    p.add_argument("--lowerings", default=LOWERINGS, help="comma-separated; the speed-up is last / first")
    p.add_argument("--requests", type=int, default=0, help="online workload size (0: skip)")
    p.add_argument("--rate", type=float, default=40.0, help="online workload: requests/s (Poisson)")
    p.add_argument("--input", default="128:1024")
    p.add_argument("--output", default="128")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import autodeploy
    from autodeploy.models.builtin import build_builtin

    model = build_builtin(args.model, dtype=torch.bfloat16, device="cuda")
    lowerings = args.lowerings.split(",")
    cms = {}
    for lowering in lowerings:
        cms[lowering] = autodeploy.compile(model, max_batch_size=args.max_batch_size, max_seq_len=2048,
                                           max_num_tokens=8192, lowering=lowering, num_pages=args.num_pages)
        print(f"{lowering}: {cms[lowering].report.lowering_reason}; warm-up "
              f"{cms[lowering].report.stage_seconds.get('warmup', 0):.1f} s", flush=True)
    res = {"model": args.model, "steps": [], "online": {}}
    print(f"{'decodes':>7} {'prefill':>7} {'tokens':>6} " + " ".join(f"{m + ' ms':>20}" for m in lowerings)
          + f" {'GPU busy ms':>11} {'(first)':>8} {'speed-up':>8}")
    vocab = cms[lowerings[0]].vocab_size
    for d in (int(x) for x in args.decodes.split(",")):
        for pre in (int(x) for x in args.prefills.split(",")):
            if _pages_needed(cms[lowerings[0]], d, pre, args.ctx) > args.num_pages:
                continue
            chunks = mixed_chunks(cms[lowerings[0]], d, pre, args.ctx, vocab)
            walls = [step_ms(cms[m], cms[m].pack(chunks), args.reps) for m in lowerings]
            # GPU busy time of the last lowering's step (uncaptured with cudagraph-decode) and of the first one's
            # (with whole-step graphs: the padded bucket's kernels)
            busy = gpu_busy_ms(cms[lowerings[-1]], cms[lowerings[-1]].pack(chunks))
            busy_first = gpu_busy_ms(cms[lowerings[0]], cms[lowerings[0]].pack(chunks))
            res["steps"].append({"decodes": d, "prefill": pre, "wall_ms": dict(zip(lowerings, walls)),
                                 "gpu_busy_ms": busy, "gpu_busy_ms_first": busy_first})
            print(f"{d:>7} {pre:>7} {d + pre:>6} " + " ".join(f"{w:20.2f}" for w in walls)
                  + f" {busy:11.2f} {busy_first:8.2f} {walls[-1] / walls[0]:7.2f}x", flush=True)
    if args.requests:
        from autodeploy.entrypoints.bench import make_workload, run_workload
        from autodeploy.runtime.engine import Engine

        wl = make_workload(args.requests, args.input, args.output, args.rate, vocab, 0)
        for m in lowerings:
            r = run_workload(Engine(cms[m]), wl, progress=False)
            res["online"][m] = {k: r[k] for k in ("output_tok_per_s", "elapsed_s", "ttft_s", "tpot_s", "steps")}
            print(f"online {args.requests} req at {args.rate}/s (in {args.input}, out {args.output}) {m}: "
                  f"{r['output_tok_per_s']:,.0f} output tok/s, TTFT p50/p90 {r['ttft_s']['p50'] * 1e3:.0f}/"
                  f"{r['ttft_s']['p90'] * 1e3:.0f} ms, TPOT p50/p90 {r['tpot_s']['p50'] * 1e3:.1f}/"
                  f"{r['tpot_s']['p90'] * 1e3:.1f} ms, {r['steps']} steps", flush=True)
    for m, cm in cms.items():
        for runner in (cm.mixed_graphs, cm.piecewise):
            if runner is not None:
                print(f"{m} {type(runner).__name__} captures (bucket: ms):",
                      {b: round(t * 1e3) for b, t in sorted(runner.captured.items())},
                      "replays:", dict(sorted(runner.replays.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    main()
