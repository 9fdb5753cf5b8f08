"""Where a captured decode step's GPU time goes, kernel by kernel: busy time and the idle gap before each kernel.

Replays the CUDA graph of a ``--batch``-sequence decode step under the torch profiler and reads the kernel
timeline (CUPTI records kernels inside graph replays): per kernel kind, launches per step, summed duration and
summed gap before it (the time the GPU ran nothing because that kernel had not started yet). One layer's kernel
sequence is printed in order, so the cost of each link of the chain is visible.

Usage: python benchmarks/diag_decode_step.py [--model llama-3.2-1b] [--batch 1] [--ctx 512]
       [--quantization fp8] [--kv-cache-dtype fp8] [--prefill 64:128 (a mixed step: 64 prompts of 128 tokens)]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import decode_chunks, run_prefills  # noqa: E402


def short(name: str) -> str:
    """A kernel's kind: Triton kernels keep their function name, library kernels a recognisable stem."""
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name[:48]


def kernel_timeline(fn, reps: int) -> list[tuple[str, float, float]]:
    """The kernels of ``reps`` back-to-back runs of ``fn`` as (kernel, start us, duration us)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    # copies and memsets too: between engine steps they are links of the chain (token readback, input upload)
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    return [(short(e["name"]), float(e["ts"]), float(e["dur"])) for e in kernels]


def report(run, n: int, layer_kernels: int) -> dict:
    """Per-step averages over ``n`` steps whose kernels are ``run`` (in start order)."""
    per_kind = collections.defaultdict(lambda: [0, 0.0, 0.0])
    span = (run[-1][1] + run[-1][2] - run[0][1]) / n
    busy = sum(d for _, _, d in run) / n
    prev_end = run[0][1]
    for name, ts, dur in run:
        k = per_kind[name]
        k[0] += 1
        k[1] += dur
        k[2] += max(0.0, ts - prev_end)
        prev_end = max(prev_end, ts + dur)
    print(f"{n} steps: {span:.1f} us per step, kernels busy {busy:.1f} us, {len(run) / n:.0f} kernels per step")
    print(f"{'kernel':50s} {'/step':>5} {'busy us':>8} {'gap us':>8} {'busy/launch':>11}")
    rows = sorted(per_kind.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
    for name, (count, dur, gap) in rows:
        print(f"{name:50s} {count / n:5.0f} {dur / n:8.1f} {gap / n:8.1f} {dur / count:11.2f}")
    # one step's prologue and first layers: from the kernel after the longest kernel (the LM head) of a middle step
    mid = len(run) // 2
    head = max(range(mid, min(len(run), mid + len(run) // n + 1)), key=lambda i: run[i][2])
    print(f"step prologue and first layers (from kernel {head + 1}): name, start after previous start, gap before, "
          f"duration (us)")
    prev_start, prev_end = run[head][1], run[head][1] + run[head][2]
    for name, ts, dur in run[head + 1:head + 1 + layer_kernels]:
        print(f"  {name:50s} {ts - prev_start:7.2f} {ts - prev_end:7.2f} {dur:7.2f}")
        prev_start, prev_end = ts, max(prev_end, ts + dur)
    return {"span_us": span, "busy_us": busy,
            "kinds": {k: {"per_step": v[0] / n, "busy_us": v[1] / n, "gap_us": v[2] / n} for k, v in rows}}


def prompt_chunks(cm, n: int, length: int, after: int, ctx: int) -> list:
    """``n`` fresh ``length``-token prompts on pages after those of ``after`` decodes at context ``ctx``."""
    from autodeploy.metadata import SequenceChunk

    first = after * -(-(ctx + 1) // cm.page_size)
    per = -(-length // cm.page_size)
    g = torch.Generator().manual_seed(5)
    return [SequenceChunk(torch.randint(0, cm.vocab_size, (length,), generator=g).tolist(), 0,
                          list(range(first + i * per, first + (i + 1) * per))) for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--layer-kernels", type=int, default=60, help="kernels of the step timeline to print")
    p.add_argument("--engine", action="store_true",
                   help="profile whole engine steps (sampling, input copies, asynchronous scheduling)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--quantization", default=None, choices=["fp8", "int8", "int8-weight"])
    p.add_argument("--prefill", default=None, metavar="N:L",
                   help="a mixed step: N fresh L-token prompts beside the --batch decodes (runs uncaptured above "
                        "the largest token bucket)")
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import autodeploy
    from autodeploy.models.builtin import build_builtin

    prompts, plen = (int(v) for v in args.prefill.split(":")) if args.prefill else (0, 0)
    cm = autodeploy.compile(build_builtin(args.model, dtype=torch.bfloat16, device="cuda"),
                            max_batch_size=max(8, args.batch + prompts), max_seq_len=max(args.ctx, plen) + 256,
                            kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                            max_num_tokens=max(args.max_num_tokens, prompts * plen + args.batch))
    print(cm.report.cache)
    if args.engine:
        from autodeploy.runtime.engine import Engine
        from autodeploy.runtime.sampling import SamplingConfig

        engine = Engine(cm)
        for i in range(args.batch):
            engine.add_request([1 + i] * args.ctx, SamplingConfig(max_new_tokens=200, ignore_eos=True))
        run_prefills(engine)
        running = list(engine.scheduler.running)
        print(f"engine: {len(running)} running, contexts {sorted({len(r.seqs[0].token_ids) for r in running})}")
        fn = engine.step
    else:
        batch = cm.pack(decode_chunks(cm, args.batch, args.ctx) + prompt_chunks(cm, prompts, plen, args.batch,
                                                                             args.ctx))
        if not batch.bucket and not prompts:
            print("this step is not a captured bucket (is the lowering cudagraph and the GPU present?)")
        fn = lambda: cm.forward(batch)  # noqa: E731
    res = report(kernel_timeline(fn, args.reps), args.reps, args.layer_kernels)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
